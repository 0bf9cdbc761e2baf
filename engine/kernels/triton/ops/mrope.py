"""Triton multimodal rotary cos/sin (Qwen2-VL sectioned, Qwen3-VL interleaved) in one launch.

transformers builds them with ~10 kernels (expand, matmul-like product, cos, sin, scale, split/cat per section
and per tensor, cast). Here each output element picks its position axis from a per-frequency table and
writes both halves of cos and sin directly. Forward only: positions and inv_freq carry no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.launch import launch
from engine.kernels.triton.runtime import next_power_of_2


@triton.jit
def _mrope_cos_sin(
    POS,
    INV_FREQ,
    AXIS,
    COS,
    SIN,
    spa,
    spb,
    spt,
    seq_len,
    n_rows,
    half,
    scaling,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    dmask = dims < half
    b = (rows // seq_len).to(tl.int64)
    t = (rows % seq_len).to(tl.int64)
    axis = tl.load(AXIS + dims, mask=dmask, other=0).to(tl.int64)
    inv = tl.load(INV_FREQ + dims, mask=dmask, other=0.0).to(tl.float32)
    mask = rmask[:, None] & dmask[None, :]
    pos = tl.load(POS + axis[None, :] * spa + b[:, None] * spb + t[:, None] * spt, mask=mask, other=0)
    freq = pos.to(tl.float32) * inv[None, :]
    c = (tl.cos(freq) * scaling).to(COS.dtype.element_ty)
    s = (tl.sin(freq) * scaling).to(SIN.dtype.element_ty)
    out = rows.to(tl.int64)[:, None] * (2 * half) + dims[None, :]
    tl.store(COS + out, c, mask=mask)
    tl.store(COS + out + half, c, mask=mask)
    tl.store(SIN + out, s, mask=mask)
    tl.store(SIN + out + half, s, mask=mask)


def mrope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    axis_table: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, 2 * len(inv_freq)]`` from positions ``[3, B, T]`` (or ``[B, T]``, used for all axes)."""
    pos = position_ids.expand(3, -1, -1)
    _, batch, seq = pos.shape
    half = inv_freq.shape[0]
    cos = torch.empty(batch, seq, 2 * half, dtype=dtype, device=pos.device)
    sin = torch.empty_like(cos)
    n_rows = batch * seq
    block_t = 16
    launch(
        _mrope_cos_sin,
        (triton.cdiv(n_rows, block_t),),
        pos,
        inv_freq,
        axis_table,
        cos,
        sin,
        *pos.stride(),
        seq,
        n_rows,
        half,
        float(scaling),
        BLOCK_T=block_t,
        BLOCK_D=next_power_of_2(half),
        num_warps=4,
    )
    return cos, sin
