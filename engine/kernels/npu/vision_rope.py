"""Qwen2-VL vision-tower RoPE on Ascend: fp32 ``npu_rotary_mul``, like transformers' own fp32 math."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import NpuKernel, torch_npu


class NpuQwen2VLRoPEKernel(NpuKernel):
    """``apply_rotary_pos_emb_vision``. Manual, as in the seed.

    In transformers>=5 the text-side multimodal section merge lives in the rotary-embedding module and the text
    rotation is the plain ``apply_rotary_pos_emb`` (patched by :class:`NpuRoPEKernel`).
    """

    type = KernelType.ROPE
    kind = "vision_rope"
    device = "npu"
    auto_register = False

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin) -> bool:  # noqa: ANN001
        return q.dim() == 3 and cos.dim() == 2

    @classmethod
    def run(
        cls, fn: object, options: BaseModel, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos4, sin4 = cos[None, :, None, :].float(), sin[None, :, None, :].float()
        npu = torch_npu()
        q_out = npu.npu_rotary_mul(q.float().unsqueeze(0), cos4, sin4).squeeze(0)
        k_out = npu.npu_rotary_mul(k.float().unsqueeze(0), cos4, sin4).squeeze(0)
        return q_out.to(q.dtype), k_out.to(k.dtype)
