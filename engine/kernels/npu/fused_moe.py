"""Qwen3-MoE / Qwen3-VL-MoE experts on Ascend: token permute, two grouped matmuls, swiglu, unpermute.

Per-expert token counts stay on the device (``bincount``), so there is no host sync per layer, and the
expert weights are passed as transposed *views* of the 3-D parameters: no copy, no per-step transpose kernel.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import NpuKernel, torch_npu

GROUP_LIST_COUNTS = 1  # group_list holds per-group sizes, not cumulative offsets
SPLIT_SINGLE_TENSOR = 2  # x and y are single tensors split along M by group_list
GROUP_ON_M = 0


MAX_GROUPS = 128  # documented limit of npu_grouped_matmul's group_list


class NpuFusedMoEKernel(NpuKernel):
    type = KernelType.MOE
    device = "npu"

    @classmethod
    def incompatibility(cls, module: nn.Module, options: BaseModel) -> str | None:
        experts = module.gate_up_proj.shape[0]
        if experts > MAX_GROUPS:
            return f"{experts} experts exceed npu_grouped_matmul's {MAX_GROUPS} groups"
        return None

    @classmethod
    def run(
        cls,
        module: nn.Module,
        options: BaseModel,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        npu = torch_npu()
        num_experts = module.gate_up_proj.shape[0]
        permuted, sorted_indices = npu.npu_moe_token_permute(hidden_states, top_k_index)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).to(torch.int64)

        def grouped(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return npu.npu_grouped_matmul(
                [x],
                [weight.transpose(1, 2)],
                group_list=counts,
                split_item=SPLIT_SINGLE_TENSOR,
                group_type=GROUP_ON_M,
                group_list_type=GROUP_LIST_COUNTS,
            )[0]

        activated = npu.npu_swiglu(grouped(permuted, module.gate_up_proj), dim=-1)
        expert_out = grouped(activated, module.down_proj)
        out = npu.npu_moe_token_unpermute(expert_out, sorted_indices, probs=top_k_weights.to(expert_out.dtype))
        return out.to(hidden_states.dtype)


NpuMoEFusedMoEKernel = NpuFusedMoEKernel  # the seed's name
