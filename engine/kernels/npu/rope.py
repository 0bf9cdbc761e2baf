"""Rotary embeddings on Ascend through ``torch_npu.npu_rotary_mul``."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import NpuKernel, torch_npu


class NpuRoPEKernel(NpuKernel):
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` for q/k of shape [B, H, S, D] (or [B, S, H, D])."""

    type = KernelType.ROPE
    device = "npu"

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:  # noqa: ANN001
        return q.dim() == 4 and cos.dim() == 3

    @classmethod
    def run(
        cls,
        fn: object,
        options: BaseModel,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        npu = torch_npu()
        return npu.npu_rotary_mul(q, cos, sin), npu.npu_rotary_mul(k, cos, sin)
