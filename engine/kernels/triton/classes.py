"""Kernel classes for device ``cuda`` backed by the Triton kernels in this package."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels import reference
from engine.kernels.base import Kernel
from engine.kernels.kernel_types import rms_norm_eps
from engine.kernels.options import MRopeOptions, RMSNormOptions
from engine.kernels.triton import runtime


class TritonKernel(Kernel):
    """Base of the Triton kernels (no type/device, so it does not register)."""

    requires: ClassVar[str] = "triton"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return runtime.unavailable_reason()

    @classmethod
    def runs_on(cls, tensor: torch.Tensor) -> bool:
        return runtime.runs_on(tensor)


class TritonRMSNormKernel(TritonKernel):
    type = "rms_norm"
    device = "cuda"

    @classmethod
    def module_forward(cls, module: nn.Module, options: RMSNormOptions, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.triton.rms_norm import MAX_FUSED_COLUMNS, rms_norm

        if x.shape[-1] > MAX_FUSED_COLUMNS:
            return type(module).forward(module, x)
        return rms_norm(x, module.weight, rms_norm_eps(module), options.weight_offset, options.casting == "gemma")


class TritonSwiGluKernel(TritonKernel):
    type = "swiglu"
    device = "cuda"

    @classmethod
    def module_forward(cls, module: nn.Module, options: BaseModel, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.triton.swiglu import swiglu

        gate, up = module.gate_proj(x), module.up_proj(x)
        if gate.shape != up.shape or gate.dtype != up.dtype:
            return module.down_proj(module.act_fn(gate) * up)
        return module.down_proj(swiglu(gate, up))


def _rope_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (
        q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and q.shape[-1] % 2 == 0
        and cos.shape[-1] == q.shape[-1]
        and not (cos.requires_grad or sin.requires_grad)
    )


class TritonRoPEKernel(TritonKernel):
    """``apply_rotary_pos_emb`` with q and k rotated in one launch."""

    type = "rope"
    device = "cuda"

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
        from engine.kernels.triton.rope import rope

        same_dtype = q.dtype == k.dtype == cos.dtype == sin.dtype
        if args or kwargs or unsqueeze_dim not in (1, 2) or not same_dtype or not _rope_fits(q, k, cos, sin):
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        if unsqueeze_dim == 2:  # q/k are [B, S, H, D]: view them as [B, H, S, D]
            q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return q_out.transpose(1, 2), k_out.transpose(1, 2)
        return rope(q, k, cos, sin)


class TritonVisionRoPEKernel(TritonKernel):
    """``apply_rotary_pos_emb_vision``: q/k [S, H, D], cos/sin [S, D], fp32 math like transformers."""

    type = "vision_rope"
    device = "cuda"
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
        from engine.kernels.triton.rope import rope

        if args or kwargs or q.dim() != 3 or cos.dim() != 2 or q.dtype != k.dtype:
            return original(q, k, cos, sin, *args, **kwargs)
        q4, k4 = q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2)
        cos3, sin3 = cos.unsqueeze(0), sin.unsqueeze(0)
        if not _rope_fits(q4, k4, cos3, sin3):
            return original(q, k, cos, sin)
        q_out, k_out = rope(q4, k4, cos3, sin3)
        return q_out.transpose(1, 2).squeeze(0), k_out.transpose(1, 2).squeeze(0)


class TritonFusedMoEKernel(TritonKernel):
    """transformers>=5 experts (Qwen3-MoE, Qwen3-VL-MoE): grouped GEMMs with fused SwiGLU, no host sync."""

    type = "fused_moe"
    device = "cuda"

    @classmethod
    def module_forward(
        cls,
        module: nn.Module,
        options: BaseModel,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        from engine.kernels.triton.moe import fused_moe

        gate_up, down = module.gate_up_proj, module.down_proj
        if not (hidden_states.dtype == gate_up.dtype == down.dtype) or hidden_states.dim() != 2:
            return type(module).forward(module, hidden_states, top_k_index, top_k_weights)
        return fused_moe(hidden_states, gate_up, down, top_k_index, top_k_weights)


class TritonMRoPEKernel(TritonKernel):
    """Qwen2-VL / Qwen3-VL text rotary embedding: multimodal cos/sin in one launch."""

    type = "mrope"
    device = "cuda"
    _tables: ClassVar[weakref.WeakKeyDictionary[nn.Module, torch.Tensor]] = weakref.WeakKeyDictionary()

    @classmethod
    def _axis_table(cls, module: nn.Module, options: MRopeOptions, device: torch.device) -> torch.Tensor:
        table = cls._tables.get(module)
        if table is None or table.device != device:
            cpu = reference.mrope_axis_table(module.inv_freq.shape[0], list(module.mrope_section), options.layout)
            table = cpu.to(device)
            cls._tables[module] = table
        return table

    @classmethod
    def module_forward(
        cls, module: nn.Module, options: MRopeOptions, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.triton.mrope import mrope_cos_sin

        inv_freq = module.inv_freq.to(device=x.device, dtype=torch.float32)
        if position_ids.dim() == 2:
            position_ids = position_ids[None]
        if position_ids.dim() != 3 or position_ids.shape[0] not in (1, 3):
            return type(module).forward(module, x, position_ids)
        table = cls._axis_table(module, options, x.device)
        return mrope_cos_sin(position_ids, inv_freq, table, module.attention_scaling, x.dtype)
