"""``mrope``: the multimodal (t, h, w) rotary cos/sin module of Qwen2-VL (sectioned) and Qwen3-VL (interleaved)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from engine.kernels.kinds.base import KernelKind, KernelType, mismatch, probe_twin

Layout = Literal["sectioned", "interleaved"]


class MRopeOptions(BaseModel):
    """``sectioned``: Qwen2-VL / Qwen2.5-VL; ``interleaved``: Qwen3-VL."""

    model_config = ConfigDict(extra="forbid")
    layout: Layout = "sectioned"


def axis_table(half_dim: int, mrope_section: Sequence[int], layout: Layout = "sectioned") -> torch.Tensor:
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
        table[torch.arange(axis, mrope_section[axis] * 3, 3)] = axis
    return table


def reference(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    table: torch.Tensor,
    attention_scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, head_dim]`` for 3-axis positions ``[3, B, T]``."""
    pos = position_ids.expand(3, -1, -1).float()
    freqs = pos[..., None] * inv_freq.float().to(pos.device)  # [3, B, T, D/2]
    index = table.to(device=pos.device, dtype=torch.long)
    picked = freqs.gather(0, index.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
    emb = torch.cat((picked, picked), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def check(module: Any, options: MRopeOptions) -> str | None:
    inv_freq = getattr(module, "inv_freq", None)
    section = getattr(module, "mrope_section", None)
    if not isinstance(inv_freq, torch.Tensor) or section is None:
        return "module has no `inv_freq` buffer and `mrope_section`"
    if getattr(module, "rope_type", "default") != "default":
        return f"rope_type {module.rope_type!r} updates inv_freq at run time; only 'default' is fused"
    try:
        axis_table(inv_freq.shape[0], list(section), options.layout)
    except ValueError as exc:
        return str(exc)
    return None


def probe(module: Any, options: MRopeOptions) -> str | None:
    twin = probe_twin(module)
    if twin is None:
        return None
    inv_freq = twin.inv_freq
    pos = torch.randint(0, 64, (3, 2, 5), generator=torch.Generator().manual_seed(0)).to(inv_freq.device)
    x = torch.zeros(1, device=inv_freq.device, dtype=torch.float32)
    table = axis_table(inv_freq.shape[0], list(module.mrope_section), options.layout)
    with torch.no_grad():
        got = twin.forward(x, pos)
        want = reference(pos, inv_freq, table, module.attention_scaling, torch.float32)
    return mismatch(got, want)


KIND = KernelKind("mrope", KernelType.ROPE, "module", ("x", "position_ids"), check, probe, MRopeOptions)
