"""transformers>=5 experts (Qwen3-MoE, Qwen3-VL-MoE) on CUDA: grouped GEMMs with fused SwiGLU, no host sync."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.triton.base import TritonKernel


class TritonFusedMoEKernel(TritonKernel):
    type = KernelType.MOE
    device = "cuda"

    @classmethod
    def supports(cls, options: BaseModel, hidden_states, top_k_index, top_k_weights) -> bool:  # noqa: ANN001
        return hidden_states.dim() == 2 and top_k_index.dim() == 2

    @classmethod
    def run(
        cls,
        module: nn.Module,
        options: BaseModel,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        from engine.kernels.triton.ops.moe import fused_moe

        gate_up, down = module.gate_up_proj, module.down_proj
        if not hidden_states.dtype == gate_up.dtype == down.dtype:
            return type(module).forward(module, hidden_states, top_k_index, top_k_weights)
        return fused_moe(hidden_states, gate_up, down, top_k_index, top_k_weights)
