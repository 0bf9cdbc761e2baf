"""Rotary position embedding references (text, vision and Qwen2-VL multimodal cos/sin)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

MRopeLayout = Literal["sectioned", "interleaved"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb``."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def vision_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb_vision``: fp32 math, cast back to the input dtype."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    q_out = qf * cos + rotate_half(qf) * sin
    k_out = kf * cos + rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def mrope_axis_table(half_dim: int, mrope_section: Sequence[int], layout: MRopeLayout = "sectioned") -> torch.Tensor:
    """For each of the ``head_dim // 2`` frequencies, which position axis (0=t, 1=h, 2=w) drives it."""
    if sum(mrope_section) != half_dim:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {half_dim}")
    if layout == "sectioned":
        # transformers cycles i % 3 over the sections, so a 4th+ section reuses axes 0, 1, 2.
        axes = []
        for i, width in enumerate(mrope_section):
            axes.extend([i % 3] * width)
        return torch.tensor(axes, dtype=torch.int32)
    table = torch.zeros(half_dim, dtype=torch.int32)
    for axis in (1, 2):
        idx = torch.arange(axis, mrope_section[axis] * 3, 3)
        table[idx] = axis
    return table


def mrope_cos_sin_reference(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    axis_table: torch.Tensor,
    attention_scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, head_dim]`` for 3-axis positions ``[3, B, T]`` (Qwen2-VL / Qwen3-VL text RoPE)."""
    pos = position_ids.expand(3, -1, -1).float()
    freqs = pos[..., None] * inv_freq.float().to(pos.device)  # [3, B, T, D/2]
    index = axis_table.to(device=pos.device, dtype=torch.long)
    picked = freqs.gather(0, index.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
    emb = torch.cat((picked, picked), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)
