"""Row-wise kernels around the fused MoE's expert GEMMs, in routing (expert-sorted) row order.

``gather_sum`` folds each token's K expert rows back into one row (optionally scaled by the routing weight); the
two SwiGLU kernels are the epilogues that ``moe_grouped`` cannot fuse into a library GEMM.
All accumulate in fp32; rows may have any stride, columns are contiguous (every tensor here is one the MoE
operators allocated themselves).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.ops.library import run_kernel, unused_pointer
from engine.kernels.triton.ops.swiglu import silu_mul, silu_mul_backward
from engine.kernels.triton.runtime import cdiv, next_power_of_2

# Rows per program, columns per program (at most) and warps of each kernel. Picked on an H200 by each kernel's GPU
# time in one 30B-A3B layer fwd+bwd (T=8192, bf16; a sweep over 1-8 rows, 512-2048 columns, 4-8 warps). In the
# compiled Qwen3-MoE step the SwiGLU backward went from 0.71 ms (one row per program, session 7) to 0.60.
TUNING: dict[str, tuple[int, int, int]] = {
    "gather_sum": (1, 1024, 4),
    "swiglu_rows": (2, 1024, 4),
    "swiglu_rows_backward": (2, 512, 4),
}


@triton.jit
def _gather_sum_kernel(
    SRC,
    DST,
    INVERSE,
    ROW_SCALE,
    tokens,
    top_k,
    hidden,
    stride_s,
    stride_d,
    SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """DST[t] = sum_k scale[r] * SRC[r] with r = inverse[t * top_k + k], in fp32 (k in order)."""
    ts = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = ts < tokens
    mask = t_mask[:, None] & (hs < hidden)[None, :]
    ts64 = ts.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for k in range(top_k):
        rows = tl.load(INVERSE + ts64 * top_k + k, mask=t_mask, other=0).to(tl.int64)
        src = tl.load(SRC + rows[:, None] * stride_s + hs[None, :], mask=mask, other=0.0).to(tl.float32)
        if SCALE:
            src = src * tl.load(ROW_SCALE + rows, mask=t_mask, other=0.0).to(tl.float32)[:, None]
        acc += src
    tl.store(DST + ts64[:, None] * stride_d + hs[None, :], acc.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_rows_kernel(GATE_UP, ACT, n_rows, inter, stride_g, stride_a, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """ACT[r] = silu(GATE_UP[r, :I]) * GATE_UP[r, I:]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < inter)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate = tl.load(GATE_UP + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + rows64 * stride_g + inter + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(ACT + rows64 * stride_a + cols[None, :], silu_mul(gate, up).to(ACT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_rows_backward_kernel(
    GATE_UP,
    D_ACT,
    ROW_SCALE,
    D_GATE_UP,
    ACT_SCALED,
    D_ROW_SCALE,
    n_rows,
    inter,
    stride_g,
    stride_da,
    stride_dg,
    stride_as,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """For row r with routing weight w (the forward scaled the expert output by w), with
    act = silu(gate) * up recomputed and rounded as ``_swiglu_rows_kernel`` stored it:
    D_GATE_UP[r] = d(silu(gate) * up) at upstream gradient w * D_ACT[r]; ACT_SCALED[r] = w * act (the
    down-projection weight gradient's operand); D_ROW_SCALE[r] = <D_ACT[r], act> (the routing-weight gradient)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    scale = tl.load(ROW_SCALE + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    d_scale = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK))[None, :]
        mask = row_mask[:, None] & (cols < inter)
        gate = tl.load(GATE_UP + rows64 * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GATE_UP + rows64 * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
        act = silu_mul(gate, up).to(GATE_UP.dtype.element_ty).to(tl.float32)
        d_act = tl.load(D_ACT + rows64 * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
        d_scale += d_act * act
        d_gate, d_up = silu_mul_backward(gate, up, d_act * scale)
        tl.store(D_GATE_UP + rows64 * stride_dg + cols, d_gate.to(D_GATE_UP.dtype.element_ty), mask=mask)
        tl.store(D_GATE_UP + rows64 * stride_dg + inter + cols, d_up.to(D_GATE_UP.dtype.element_ty), mask=mask)
        tl.store(ACT_SCALED + rows64 * stride_as + cols, (act * scale).to(ACT_SCALED.dtype.element_ty), mask=mask)
    tl.store(D_ROW_SCALE + rows, tl.sum(d_scale, axis=1), mask=row_mask)


def _launch_shape(name: str, cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK, column blocks, warps) of ``TUNING[name]`` for rows of ``cols`` columns."""
    block_r, max_block, warps = TUNING[name]
    block = min(max_block, next_power_of_2(cols))
    return block_r, block, cdiv(cols, block), warps


def gather_sum(
    src: torch.Tensor,
    inverse: torch.Tensor,
    tokens: int,
    top_k: int,
    dtype: torch.dtype,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum_k row_scale[r] * src[r] over r = inverse[t * top_k + k] (no scale when None), fp32 sums."""
    hidden = src.shape[1]
    out = torch.empty(tokens, hidden, dtype=dtype, device=src.device)
    if tokens == 0:
        return out
    block_r, block_h, col_blocks, warps = _launch_shape("gather_sum", hidden)
    run_kernel(
        _gather_sum_kernel,
        (cdiv(tokens, block_r), col_blocks),
        src,
        out,
        inverse,
        row_scale if row_scale is not None else unused_pointer(out),
        tokens,
        top_k,
        hidden,
        src.stride(0),
        out.stride(0),
        SCALE=row_scale is not None,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return out


def swiglu_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """[R, 2I] pre-activations -> [R, I] ``silu(gate) * up`` in their dtype."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    act = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block_r, block, col_blocks, warps = _launch_shape("swiglu_rows", inter)
        run_kernel(
            _swiglu_rows_kernel,
            (cdiv(rows, block_r), col_blocks),
            gate_up,
            act,
            rows,
            inter,
            gate_up.stride(0),
            act.stride(0),
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=warps,
        )
    return act


def swiglu_rows_backward(
    gate_up: torch.Tensor, d_act: torch.Tensor, row_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_gate_up [R, 2I], row_scale * act [R, I], d_row_scale [R] fp32); see the kernel's docstring."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    d_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
    act_scaled = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    d_row_scale = torch.empty(rows, dtype=torch.float32, device=gate_up.device)
    if rows:
        block_r, block, _, warps = _launch_shape("swiglu_rows_backward", inter)
        run_kernel(
            _swiglu_rows_backward_kernel,
            (cdiv(rows, block_r),),
            gate_up,
            d_act,
            row_scale,
            d_gate_up,
            act_scaled,
            d_row_scale,
            rows,
            inter,
            gate_up.stride(0),
            d_act.stride(0),
            d_gate_up.stride(0),
            act_scaled.stride(0),
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=warps,
        )
    return d_gate_up, act_scaled, d_row_scale
