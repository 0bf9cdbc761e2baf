"""MoE experts reference for transformers 5.x expert modules (3D ``gate_up_proj`` / ``down_proj``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts_reference(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """``sum_k w[t,k] * down[e](silu(gate[e](x)) * up[e](x))`` with ``e = top_k_index[t,k]``, looped per expert."""
    out = torch.zeros_like(hidden_states)
    num_experts = gate_up_proj.shape[0]
    for expert in range(num_experts):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden_states[token_idx], gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[expert]) * top_k_weights[token_idx, slot, None]
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out
