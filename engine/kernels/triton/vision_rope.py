"""Qwen2-VL vision-tower RoPE on CUDA: q/k [S, H, D], cos/sin [S, D], fp32 math like transformers."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.triton.base import TritonKernel


class TritonVisionRoPEKernel(TritonKernel):
    type = KernelType.ROPE
    kind = "vision_rope"
    device = "cuda"
    under_compile = "original"  # Inductor generates this kernel too and fuses it with its neighbours
    auto_register = False

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin) -> bool:  # noqa: ANN001
        from engine.kernels.triton.ops.rope import check_vision_rope_args

        try:
            check_vision_rope_args(q, k, cos, sin)
        except ValueError:
            return False
        return True

    @classmethod
    def run(
        cls, fn: object, options: BaseModel, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.triton.ops.rope import vision_rope_checked  # supports() checked these arguments

        return vision_rope_checked(q, k, cos, sin)
