"""Rotary embeddings on Ascend through ``torch_npu.npu_rotary_mul``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel

from engine.kernels.npu.base import NpuKernel, torch_npu


class NpuRoPEKernel(NpuKernel):
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` for q/k of shape [B, H, S, D] (or [B, S, H, D])."""

    type = "rope"
    device = "npu"

    @classmethod
    def function(
        cls,
        original: Callable[..., Any],
        options: BaseModel,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if args or kwargs or q.dim() != 4 or cos.dim() != 3:
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        npu = torch_npu()
        return npu.npu_rotary_mul(q, cos, sin), npu.npu_rotary_mul(k, cos, sin)


class NpuQwen2VLRoPEKernel(NpuKernel):
    """Qwen2-VL vision-tower RoPE (``apply_rotary_pos_emb_vision``): fp32 ``npu_rotary_mul`` like transformers.

    In transformers>=5 the text-side multimodal section merge lives in the rotary-embedding module and the text
    rotation is the plain ``apply_rotary_pos_emb`` (patched by :class:`NpuRoPEKernel`). Manual only.
    """

    type = "vision_rope"
    device = "npu"
    auto_register = False

    @classmethod
    def function(
        cls,
        original: Callable[..., Any],
        options: BaseModel,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if args or kwargs or q.dim() != 3 or cos.dim() != 2:
            return original(q, k, cos, sin, *args, **kwargs)
        cos4, sin4 = cos[None, :, None, :].float(), sin[None, :, None, :].float()
        npu = torch_npu()
        q_out = npu.npu_rotary_mul(q.float().unsqueeze(0), cos4, sin4).squeeze(0)
        k_out = npu.npu_rotary_mul(k.float().unsqueeze(0), cos4, sin4).squeeze(0)
        return q_out.to(q.dtype), k_out.to(k.dtype)
