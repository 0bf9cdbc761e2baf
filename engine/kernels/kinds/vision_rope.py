"""``vision_rope``: Qwen2-VL's ``apply_rotary_pos_emb_vision(q, k, cos, sin)``: fp32 math, cast back."""

from __future__ import annotations

from typing import Any

import torch

from engine.kernels.kinds.base import KernelKind, KernelType, NoOptions, mismatch, probe_tensor
from engine.kernels.kinds.rope import rotate_half, signature_problem

PARAMS = ("q", "k", "cos", "sin")


def reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k ``[S, H, D]``, cos/sin ``[S, D]``, computed in fp32 and returned in q's and k's dtypes."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    q_out = qf * cos + rotate_half(qf) * sin
    k_out = kf * cos + rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def check(fn: Any, options: NoOptions) -> str | None:
    return signature_problem(fn, PARAMS)


def probe(fn: Any, options: NoOptions) -> str | None:
    q, k = probe_tensor(5, 3, 8, seed=1), probe_tensor(5, 3, 8, seed=2)
    cos, sin = probe_tensor(5, 8, seed=3), probe_tensor(5, 8, seed=4)
    with torch.no_grad():
        return mismatch(fn(q, k, cos, sin), reference(q, k, cos, sin))


KIND = KernelKind("vision_rope", KernelType.ROPE, "function", PARAMS, check, probe)
