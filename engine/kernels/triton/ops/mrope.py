"""Triton multimodal rotary cos/sin (Qwen2-VL sectioned, Qwen3-VL interleaved) in one launch.

transformers builds them with ~10 kernels (expand, matmul-like product, cos, sin, scale, split/cat per section
and per tensor, cast). Here each output element picks its position axis from a per-frequency table and
writes both halves of cos and sin directly. Forward only (``engine::mrope_cos_sin``): positions and inv_freq
carry no gradient. Every input may have any stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.ops.library import KernelOp, run_kernel
from engine.kernels.triton.runtime import cdiv, next_power_of_2


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
    s_inv,
    s_axis,
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
    axis = tl.load(AXIS + dims * s_axis, mask=dmask, other=0).to(tl.int64)
    inv = tl.load(INV_FREQ + dims * s_inv, mask=dmask, other=0.0).to(tl.float32)
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


def _cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    axis_table: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    pos = position_ids.expand(3, -1, -1)
    _, batch, seq = pos.shape
    half = inv_freq.shape[0]
    cos = torch.empty(batch, seq, 2 * half, dtype=dtype, device=pos.device)
    sin = torch.empty_like(cos)
    n_rows = batch * seq
    if n_rows == 0:
        return cos, sin
    block_t = 16
    run_kernel(
        _mrope_cos_sin,
        (cdiv(n_rows, block_t),),
        pos,
        inv_freq,
        axis_table,
        cos,
        sin,
        *pos.stride(),
        inv_freq.stride(0),
        axis_table.stride(0),
        seq,
        n_rows,
        half,
        scaling,
        BLOCK_T=block_t,
        BLOCK_D=next_power_of_2(half),
        num_warps=4,
    )
    return cos, sin


MROPE_COS_SIN = KernelOp("mrope_cos_sin", _cos_sin)


def check_mrope_args(position_ids: torch.Tensor, inv_freq: torch.Tensor, axis_table: torch.Tensor) -> None:
    """One-line ``ValueError`` unless positions are [B, T] or [1 or 3, B, T] and the tables are [D/2] each."""
    if not (position_ids.dim() == 2 or (position_ids.dim() == 3 and position_ids.shape[0] in (1, 3))):
        raise ValueError(f"mrope_cos_sin: position_ids {tuple(position_ids.shape)} must be [B, T] or [3, B, T]")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex:
        raise ValueError(f"mrope_cos_sin: position_ids must be integers, got {position_ids.dtype}")
    if inv_freq.dim() != 1 or axis_table.shape != inv_freq.shape:
        raise ValueError(
            f"mrope_cos_sin: inv_freq {tuple(inv_freq.shape)} and axis_table {tuple(axis_table.shape)} "
            "must both be [head_dim / 2]"
        )
    if axis_table.dtype.is_floating_point:
        raise ValueError(f"mrope_cos_sin: axis_table must hold integer axes, got {axis_table.dtype}")


def mrope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    axis_table: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, 2 * len(inv_freq)]`` from positions ``[3, B, T]`` (or ``[B, T]``, used for all axes)."""
    check_mrope_args(position_ids, inv_freq, axis_table)
    return MROPE_COS_SIN(position_ids, inv_freq, axis_table, float(scaling), dtype)
