"""``fused_moe``: a transformers>=5 experts module (3-D ``gate_up_proj`` / ``down_proj``, SiLU, no biases)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.kernels.kinds.base import KernelKind, KernelType, NoOptions, is_silu, mismatch, probe_tensor, probe_twin


def reference(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """``sum_k w[t,k] * down[e](silu(gate[e](x)) * up[e](x))`` with ``e = top_k_index[t,k]``, looped per expert."""
    out = torch.zeros_like(hidden_states)
    for expert in range(gate_up_proj.shape[0]):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden_states[token_idx], gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[expert]) * top_k_weights[token_idx, slot, None]
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out


def routing_fits(hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> bool:
    """A call every device's kernel can take: 2-D tokens, integer [T, K] indices, floating [T, K] weights."""
    return (
        hidden_states.dim() == 2
        and top_k_index.dim() == 2
        and top_k_index.shape == top_k_weights.shape
        and top_k_index.shape[0] == hidden_states.shape[0]
        and not top_k_index.is_floating_point()
        and top_k_weights.is_floating_point()
    )


def check(module: Any, options: NoOptions) -> str | None:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return "module has no 3-D `gate_up_proj`/`down_proj` parameters (transformers>=5 experts layout)"
    if gate_up.dim() != 3 or down.dim() != 3:
        return "expert weights are not 3-D [experts, out, in]"
    experts, two_i, hidden = gate_up.shape
    if two_i % 2 or down.shape != (experts, hidden, two_i // 2):
        return f"down_proj {tuple(down.shape)} does not match gate_up_proj {tuple(gate_up.shape)}"
    for flag, meaning in (
        ("has_bias", "biases"),
        ("is_transposed", "transposed [E, in, out] weights"),
        ("has_post_expert_norm", "a post-expert norm"),
    ):
        if getattr(module, flag, False):
            return f"experts with {meaning} are not fused"
    if getattr(module, "is_concatenated", True) is False or getattr(module, "has_gate", True) is False:
        return "experts without a concatenated gate/up projection are not fused"
    act = getattr(module, "act_fn", None)
    if not is_silu(act):
        return f"expert activation {type(act).__name__} is not SiLU"
    return None


def probe(module: Any, options: NoOptions) -> str | None:
    twin = probe_twin(module)
    if twin is None:
        return None
    gate_up = twin.gate_up_proj
    experts, _, hidden = gate_up.shape
    gen = torch.Generator().manual_seed(0)
    top_k = min(2, experts)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(6)]).to(gate_up.device)
    w = torch.rand(6, top_k, generator=gen).to(gate_up)
    x = probe_tensor(6, hidden, like=gate_up)
    with torch.no_grad():
        got = twin.forward(x, idx, w)
        want = reference(x, idx, w, gate_up, twin.down_proj)
    return mismatch(got, want)


KIND = KernelKind(
    "fused_moe",
    KernelType.MOE,
    "module",
    ("hidden_states", "top_k_index", "top_k_weights"),
    check,
    probe,
    fits=routing_fits,
)
