"""A CPU stand-in for the torch_npu ops the NPU kernels call, following their documented semantics.

torch_npu cannot run off Ascend hardware. This module implements, in plain torch (so autograd works), the
documented behaviour of ``npu_rms_norm``, ``npu_swiglu``, ``npu_rotary_mul``, ``npu_grouped_matmul``,
``npu_moe_token_permute`` and ``npu_moe_token_unpermute``, including the argument checks the docs state.
It marks itself with ``__engine_standin__`` so NPU kernels accept CPU tensors only while it is installed.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

MAX_GROUPS = 128  # documented maximum TensorList / group_list length of npu_grouped_matmul

calls: Counter[str] = Counter()


def npu_rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * rsqrt(mean(x^2) + eps) * gamma over gamma's dims, computed in fp32; returns (y, rstd)."""
    calls["npu_rms_norm"] += 1
    if gamma.shape != x.shape[x.dim() - gamma.dim() :]:
        raise ValueError("npu_rms_norm: gamma must match the trailing dims of x")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


def npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Split x in two halves A, B along ``dim``; return swish(A) * B."""
    calls["npu_swiglu"] += 1
    if x.shape[dim] % 2:
        raise ValueError("npu_swiglu: the split dim must be even")
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def npu_rotary_mul(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    """x * r1 + rotate_half(x) * r2 for 4-D x, with r1/r2 broadcastable 4-D tensors."""
    calls["npu_rotary_mul"] += 1
    if rotary_mode != "half":
        raise NotImplementedError("stand-in implements rotary_mode='half' only")
    if x.dim() != 4 or r1.dim() != 4 or r2.dim() != 4:
        raise ValueError("npu_rotary_mul: x, r1 and r2 must be 4-D")
    return x * r1 + _rotate_half(x) * r2


def _group_sizes(group_list: torch.Tensor | Sequence[int], group_list_type: int) -> list[int]:
    values = [int(v) for v in (group_list.tolist() if isinstance(group_list, torch.Tensor) else group_list)]
    if group_list_type == 0:  # cumulative end offsets
        return [b - a for a, b in zip([0, *values[:-1]], values, strict=True)]
    return values


def npu_grouped_matmul(
    x: list[torch.Tensor],
    weight: list[torch.Tensor],
    *,
    bias: list[torch.Tensor] | None = None,
    group_list: torch.Tensor | Sequence[int] | None = None,
    split_item: int = 0,
    group_type: int = -1,
    group_list_type: int = 0,
    **_: object,
) -> list[torch.Tensor]:
    """Grouped ``x_i @ w_i`` (+ bias). split_item 2/3: one x split along M by group_list, one y out."""
    calls["npu_grouped_matmul"] += 1
    weights = list(weight[0].unbind(0)) if len(weight) == 1 and weight[0].dim() == 3 else list(weight)
    if len(weights) > MAX_GROUPS:
        raise ValueError(f"npu_grouped_matmul: at most {MAX_GROUPS} groups")
    if split_item in (2, 3):
        if len(x) != 1 or x[0].dim() != 2 or group_list is None or group_type != 0:
            raise ValueError("npu_grouped_matmul: split_item 2/3 needs one 2-D x, group_list and group_type=0")
        sizes = _group_sizes(group_list, group_list_type)
        if len(sizes) != len(weights) or sum(sizes) > x[0].shape[0]:
            raise ValueError("npu_grouped_matmul: group_list does not fit x / weight")
        chunks = x[0][: sum(sizes)].split(sizes, dim=0)
    else:
        chunks = tuple(x)
    outs = [c @ w + (bias[i] if bias else 0) for i, (c, w) in enumerate(zip(chunks, weights, strict=True))]
    return [torch.cat(outs, dim=0)] if split_item in (2, 3) else outs


def npu_moe_token_permute(
    tokens: torch.Tensor, indices: torch.Tensor, num_out_tokens: int | None = None, padded_mode: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token copies by expert (stable): returns (permuted_tokens, sorted_indices)."""
    calls["npu_moe_token_permute"] += 1
    if padded_mode:
        raise NotImplementedError("stand-in implements padded_mode=False only")
    top_k = indices.shape[1] if indices.dim() == 2 else 1
    sorted_indices = torch.argsort(indices.reshape(-1), stable=True)
    if num_out_tokens:
        sorted_indices = sorted_indices[:num_out_tokens]
    return tokens.index_select(0, sorted_indices // top_k), sorted_indices.to(torch.int32)


def npu_moe_token_unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    probs: torch.Tensor | None = None,
    padded_mode: bool = False,
    restore_shape: torch.Size | None = None,
) -> torch.Tensor:
    """Inverse of permute: scatter rows back, weight by probs, sum the top-k copies of each token."""
    calls["npu_moe_token_unpermute"] += 1
    if padded_mode:
        raise NotImplementedError("stand-in implements padded_mode=False only")
    top_k = probs.shape[1] if probs is not None else 1
    rows = sorted_indices.numel()
    hidden = permuted_tokens.shape[-1]
    flat = permuted_tokens.new_zeros(rows, hidden).index_copy(0, sorted_indices.long(), permuted_tokens)
    flat = flat.view(rows // top_k, top_k, hidden)
    if probs is not None:
        flat = flat * probs.unsqueeze(-1).to(flat.dtype)
    return flat.sum(dim=1)


def build_module() -> types.ModuleType:
    module = types.ModuleType("torch_npu")
    # A real module has a spec; importlib.util.find_spec("torch_npu") (accelerate, transformers) needs it.
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    module.__engine_standin__ = True  # type: ignore[attr-defined]
    for fn in (
        npu_rms_norm,
        npu_swiglu,
        npu_rotary_mul,
        npu_grouped_matmul,
        npu_moe_token_permute,
        npu_moe_token_unpermute,
    ):
        setattr(module, fn.__name__, fn)
    return module


@contextmanager
def torch_npu_standin() -> Iterator[types.ModuleType]:
    """Register the stand-in as ``torch_npu`` for the duration of the block."""
    previous = sys.modules.get("torch_npu")
    module = build_module()
    sys.modules["torch_npu"] = module
    calls.clear()
    try:
        yield module
    finally:
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous
