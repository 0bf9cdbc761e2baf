"""Sorting token copies by expert and weighting them back, with gradients computed here.

Both directions use one convention, torch_npu's ``sorted_indices``: for the copy of token ``t`` sent to its
``k``-th expert (slot ``t * top_k + k``), ``rows[slot]`` is the row of the expert-sorted tensor holding it.

Where the fused ops are documented for the dtype (``npu_moe_token_permute`` / ``npu_moe_token_unpermute``:
bf16 tokens, release 7.1.0+), the forward runs through them; other dtypes take the same math in plain torch
(a stable ``argsort`` and ``index_select``). The backward is written here with index ops either way: the
fused ops have no derivative before release 7.2.0 (op-plugin ``derivatives.yaml``), and with this one the
kernel does not depend on which build provides one. Nothing reads a value on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.kernels.npu.base import torch_npu


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation held in ``order``, computed on the device."""
    positions = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return torch.empty_like(order).scatter_(0, order, positions)


class Permute(torch.autograd.Function):
    """``tokens [T, H]``, ``top_k_index [T, k]`` -> (``permuted [T*k, H]`` sorted by expert, ``rows [T*k]``)."""

    @staticmethod
    def forward(
        ctx: Any, tokens: torch.Tensor, top_k_index: torch.Tensor, fused: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        top_k = top_k_index.shape[1]
        if fused:
            permuted, rows = torch_npu().npu_moe_token_permute(tokens, top_k_index)
        else:
            order = torch.argsort(top_k_index.reshape(-1), stable=True)  # permuted row r holds slot order[r]
            permuted, rows = tokens.index_select(0, order // top_k), _inverse(order)
        ctx.top_k = top_k
        ctx.save_for_backward(rows)
        ctx.mark_non_differentiable(rows)
        return permuted, rows

    @staticmethod
    def backward(ctx: Any, d_permuted: torch.Tensor, _d_rows: Any) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        hidden = d_permuted.shape[-1]
        d_tokens = d_permuted.index_select(0, rows).view(-1, ctx.top_k, hidden).sum(dim=1)
        return d_tokens, None, None


class Unpermute(torch.autograd.Function):
    """``out[t] = sum_k expert_out[rows[t*k_ + k]] * probs[t, k]`` (``k_`` = top-k), in expert_out's dtype."""

    @staticmethod
    def forward(
        ctx: Any, expert_out: torch.Tensor, rows: torch.Tensor, probs: torch.Tensor, fused: bool
    ) -> torch.Tensor:
        if fused:
            out = torch_npu().npu_moe_token_unpermute(expert_out, rows, probs=probs)
        else:
            picked = expert_out.index_select(0, rows).view(*probs.shape, expert_out.shape[-1])
            out = (picked * probs.unsqueeze(-1)).sum(dim=1)
        ctx.save_for_backward(expert_out, rows, probs)
        return out

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        expert_out, rows, probs = ctx.saved_tensors
        hidden = expert_out.shape[-1]
        d_expert = d_probs = None
        if ctx.needs_input_grad[0]:
            d_slots = (d_out.unsqueeze(1) * probs.unsqueeze(-1)).reshape(-1, hidden)
            d_expert = torch.empty_like(expert_out).index_copy_(0, rows.long(), d_slots.to(expert_out.dtype))
        if ctx.needs_input_grad[2]:
            picked = expert_out.index_select(0, rows).view(*probs.shape, hidden)
            d_probs = (picked.float() * d_out.float().unsqueeze(1)).sum(dim=-1).to(probs.dtype)
        return d_expert, None, d_probs, None


def permute(tokens: torch.Tensor, top_k_index: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    permuted, rows = Permute.apply(tokens, top_k_index, fused)
    return permuted, rows


def unpermute(expert_out: torch.Tensor, rows: torch.Tensor, probs: torch.Tensor, fused: bool) -> torch.Tensor:
    out: torch.Tensor = Unpermute.apply(expert_out, rows, probs, fused)
    return out
