"""Qwen2-VL vision-tower RoPE on CUDA: q/k [S, H, D], cos/sin [S, D], fp32 math like transformers."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.triton.base import TritonKernel
from engine.kernels.triton.rope import rope_fits


def _as_4d(q, k, cos, sin):  # noqa: ANN001, ANN202
    return q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos.unsqueeze(0), sin.unsqueeze(0)


class TritonVisionRoPEKernel(TritonKernel):
    type = KernelType.ROPE
    kind = "vision_rope"
    device = "cuda"
    auto_register = False

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin) -> bool:  # noqa: ANN001
        return q.dim() == 3 and k.dim() == 3 and cos.dim() == 2 and rope_fits(*_as_4d(q, k, cos, sin))

    @classmethod
    def run(
        cls, fn: object, options: BaseModel, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.triton.ops.rope import rope

        q_out, k_out = rope(*_as_4d(q, k, cos, sin))
        return q_out.transpose(1, 2).squeeze(0), k_out.transpose(1, 2).squeeze(0)
