"""Qwen3-MoE / Qwen3-VL-MoE experts on Ascend: token permute, grouped matmul, swiglu, grouped matmul, unpermute.

Trains every weight: the grouped matmuls go through :class:`~engine.kernels.npu.grouped_matmul.GroupedLinear`
(torch_npu's op has no backward) and the routing through :mod:`~engine.kernels.npu.token_routing`, so
``gate_up_proj``, ``down_proj``, the hidden states and the routing weights all get gradients. Per-expert
counts stay on the device and the expert weights are only ever passed as views.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import NpuKernel, each_float, torch_npu
from engine.kernels.npu.grouped_matmul import expert_counts, grouped_linear
from engine.kernels.npu.token_routing import permute, unpermute
from engine.kernels.npu.versions import Requirement

MAX_GROUPS = 1024  # npu_grouped_matmul: groups with one 3-D weight (M split) and on the K split
INNER_LIMIT = 65536  # npu_grouped_matmul: each x / weight's innermost dim must be below this


class NpuFusedMoEKernel(NpuKernel):
    type = KernelType.MOE
    device = "npu"
    # Tensor group_list / group_type arrived in 7.0.0; the weight gradient's K split (group_type=2) in 7.2.0.
    min_torch_npu = Requirement("7.2.0")
    ops = ("npu_grouped_matmul", "npu_swiglu")
    # Used where present and documented for the dtype (7.1.0+, bf16 tokens); plain torch routing otherwise.
    routing_ops = ("npu_moe_token_permute", "npu_moe_token_unpermute")
    op_dtypes = {
        "npu_grouped_matmul": each_float(2),  # (x, weight) share one dtype; fp32 only as single tensors
        "npu_swiglu": each_float(),
        "npu_moe_token_permute": frozenset({(torch.bfloat16,)}),  # tokens
        "npu_moe_token_unpermute": frozenset({(torch.bfloat16, torch.bfloat16)}),  # (permuted_tokens, probs)
    }

    @classmethod
    def incompatibility(cls, module: nn.Module, options: BaseModel) -> str | None:
        experts, two_i, hidden = module.gate_up_proj.shape
        if getattr(module, "_is_expert_parallel", False):  # routes other ranks' tokens to a sentinel expert id
            return "expert-parallel experts (sentinel expert ids) are not fused"
        if experts > MAX_GROUPS:
            return f"{experts} experts exceed npu_grouped_matmul's {MAX_GROUPS} groups"
        if max(two_i, hidden) >= INNER_LIMIT:
            return f"expert dims {two_i}/{hidden} reach npu_grouped_matmul's inner-axis limit {INNER_LIMIT}"
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
        gate_up, down = module.gate_up_proj, module.down_proj
        gmm = "npu_grouped_matmul"
        if not (cls.accepts(gmm, hidden_states, gate_up) and cls.accepts(gmm, hidden_states, down)):
            # e.g. bf16 activations with fp32 experts (autocast): the op takes one dtype; the original decides
            return type(module).forward(module, hidden_states, top_k_index, top_k_weights)
        npu = torch_npu()
        probs = top_k_weights.to(hidden_states.dtype)
        fused = all(hasattr(npu, op) for op in cls.routing_ops) and cls.accepts("npu_moe_token_permute", hidden_states)
        counts = expert_counts(top_k_index, gate_up.shape[0])
        permuted, rows = permute(hidden_states, top_k_index, fused)
        activated = npu.npu_swiglu(grouped_linear(permuted, gate_up, counts), dim=-1)
        return unpermute(grouped_linear(activated, down, counts), rows, probs, fused)


NpuMoEFusedMoEKernel = NpuFusedMoEKernel  # the seed's name
