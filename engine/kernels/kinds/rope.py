"""``rope``: transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (rotate-half layout)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from engine.kernels.kinds.base import KernelKind, KernelType, NoOptions, mismatch, probe_tensor

PARAMS = ("q", "k", "cos", "sin", "unsqueeze_dim")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def signature_problem(fn: Any, expected: tuple[str, ...]) -> str | None:
    """Why ``fn``'s leading parameters are not ``expected`` (an optional last one may be absent), or ``None``."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "target is not a Python function with an inspectable signature"
    required = len(expected) - 1 if expected[-1] == "unsqueeze_dim" else len(expected)
    if params[:required] != list(expected[:required]) or params[required : len(expected)] not in (
        [],
        list(expected[required:]),
    ):
        return f"signature starts with {params[: len(expected)]}, expected ({', '.join(expected)}, ...)"
    return None


def check(fn: Any, options: NoOptions) -> str | None:
    return signature_problem(fn, PARAMS)


def probe(fn: Any, options: NoOptions) -> str | None:
    q, k = probe_tensor(2, 4, 5, 8, seed=1), probe_tensor(2, 2, 5, 8, seed=2)
    cos, sin = probe_tensor(2, 5, 8, seed=3), probe_tensor(2, 5, 8, seed=4)
    with torch.no_grad():
        return mismatch(fn(q, k, cos, sin), reference(q, k, cos, sin))


KIND = KernelKind("rope", KernelType.ROPE, "function", PARAMS, check, probe)
