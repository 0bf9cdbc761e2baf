"""Qwen2-VL vision-tower RoPE on Ascend: fp32 ``npu_rotary_mul``, like transformers' own fp32 math."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import NpuKernel, torch_npu
from engine.kernels.npu.rope import rotary_fits
from engine.kernels.npu.versions import Requirement

FP32 = torch.float32


class NpuQwen2VLRoPEKernel(NpuKernel):
    """``apply_rotary_pos_emb_vision``. Manual, as in the seed.

    q/k [S, H, D] become one BSND batch [1, S, H, D] with cos/sin [1, S, 1, D] (a 1S1D broadcast), computed
    in fp32 and cast back to q's dtype as transformers does. In transformers>=5 the text-side multimodal
    section merge lives in the rotary-embedding module and the text rotation is the plain
    ``apply_rotary_pos_emb`` (patched by :class:`~engine.kernels.npu.rope.NpuRoPEKernel`).
    """

    type = KernelType.ROPE
    kind = "vision_rope"
    device = "npu"
    auto_register = False
    min_torch_npu = Requirement("7.0.0")
    ops = ("npu_rotary_mul",)
    op_dtypes = {"npu_rotary_mul": frozenset({(FP32, FP32)})}  # (x, r1/r2): always run in fp32

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin) -> bool:  # noqa: ANN001
        if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2 or cos.shape != sin.shape:
            return False
        full = cos.shape[-1] == q.shape[-1] == k.shape[-1]
        return full and all(rotary_fits(t.unsqueeze(0), cos.unsqueeze(0), unsqueeze_dim=2) for t in (q, k))

    @classmethod
    def run(
        cls, fn: object, options: BaseModel, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos4, sin4 = cos[None, :, None, :].float(), sin[None, :, None, :].float()
        npu = torch_npu()
        q_out = npu.npu_rotary_mul(q.float().unsqueeze(0), cos4, sin4).squeeze(0)
        k_out = npu.npu_rotary_mul(k.float().unsqueeze(0), cos4, sin4).squeeze(0)
        return q_out.to(q.dtype), k_out.to(k.dtype)
