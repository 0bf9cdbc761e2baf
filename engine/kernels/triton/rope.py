"""``apply_rotary_pos_emb`` on CUDA: q and k rotated in one Triton launch."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.triton.base import TritonKernel


def rope_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """4-D q/k [B, H, S, D], 3-D cos/sin [B or 1, S, D] of the full head dim, one dtype, no grad on cos/sin."""
    return (
        q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and q.shape[-1] % 2 == 0
        and cos.shape[-1] == q.shape[-1] == k.shape[-1]
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and not (cos.requires_grad or sin.requires_grad)
    )


class TritonRoPEKernel(TritonKernel):
    type = KernelType.ROPE
    device = "cuda"

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:  # noqa: ANN001
        if unsqueeze_dim == 2:  # q/k are [B, S, H, D]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return unsqueeze_dim in (1, 2) and rope_fits(q, k, cos, sin)

    @classmethod
    def run(cls, fn: object, options: BaseModel, q, k, cos, sin, unsqueeze_dim: int = 1):  # noqa: ANN001
        from engine.kernels.triton.ops.rope import rope

        if unsqueeze_dim == 2:
            q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return q_out.transpose(1, 2), k_out.transpose(1, 2)
        return rope(q, k, cos, sin)
