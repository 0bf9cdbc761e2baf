"""Row-wise kernels around the fused MoE's expert GEMMs, in routing (expert-sorted) row order.

``gather_sum`` folds each token's K expert rows back into one row (optionally scaled by the routing
weight); the two SwiGLU kernels are the epilogues that ``moe_grouped`` cannot fuse into a library GEMM.
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

_MAX_BLOCK = 1024


@triton.jit
def _gather_sum_kernel(
    SRC, DST, INVERSE, ROW_SCALE, top_k, hidden, stride_s, stride_d, SCALE: tl.constexpr, BLOCK_H: tl.constexpr
):
    """DST[t] = sum_k scale[r] * SRC[r] with r = inverse[t * top_k + k], in fp32."""
    token = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hs < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(top_k):
        row = tl.load(INVERSE + token * top_k + k).to(tl.int64)
        src = tl.load(SRC + row * stride_s + hs, mask=h_mask, other=0.0).to(tl.float32)
        if SCALE:
            src = src * tl.load(ROW_SCALE + row)
        acc += src
    tl.store(DST + token * stride_d + hs, acc.to(DST.dtype.element_ty), mask=h_mask)


@triton.jit
def _swiglu_rows_kernel(GATE_UP, ACT, inter, stride_g, stride_a, BLOCK: tl.constexpr):
    """ACT[r] = silu(GATE_UP[r, :I]) * GATE_UP[r, I:]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(GATE_UP + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ACT + row * stride_a + cols, silu_mul(gate, up).to(ACT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_rows_backward_kernel(
    GATE_UP,
    D_ACT,
    ROW_SCALE,
    D_GATE_UP,
    ACT_SCALED,
    D_ROW_SCALE,
    inter,
    stride_g,
    stride_da,
    stride_dg,
    stride_as,
    BLOCK: tl.constexpr,
):
    """For one row r with routing weight w (the forward scaled the expert output by w), with
    act = silu(gate) * up recomputed and rounded as ``_swiglu_rows_kernel`` stored it:
    D_GATE_UP[r] = d(silu(gate) * up) at upstream gradient w * D_ACT[r]; ACT_SCALED[r] = w * act (the
    down-projection weight gradient's operand); D_ROW_SCALE[r] = <D_ACT[r], act> (the routing-weight gradient)."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(ROW_SCALE + row)
    d_scale = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(GATE_UP + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GATE_UP + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
        act = silu_mul(gate, up).to(GATE_UP.dtype.element_ty).to(tl.float32)
        d_act = tl.load(D_ACT + row * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
        d_scale += d_act * act
        d_gate, d_up = silu_mul_backward(gate, up, d_act * scale)
        tl.store(D_GATE_UP + row * stride_dg + cols, d_gate.to(D_GATE_UP.dtype.element_ty), mask=mask)
        tl.store(D_GATE_UP + row * stride_dg + inter + cols, d_up.to(D_GATE_UP.dtype.element_ty), mask=mask)
        tl.store(ACT_SCALED + row * stride_as + cols, (act * scale).to(ACT_SCALED.dtype.element_ty), mask=mask)
    tl.store(D_ROW_SCALE + row, tl.sum(d_scale, axis=0))


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
    block_h = min(_MAX_BLOCK, next_power_of_2(hidden))
    run_kernel(
        _gather_sum_kernel,
        (tokens, cdiv(hidden, block_h)),
        src,
        out,
        inverse,
        row_scale if row_scale is not None else unused_pointer(out),
        top_k,
        hidden,
        src.stride(0),
        out.stride(0),
        SCALE=row_scale is not None,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out


def swiglu_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """[R, 2I] pre-activations -> [R, I] ``silu(gate) * up`` in their dtype."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    act = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(_MAX_BLOCK, next_power_of_2(inter))
    if rows:
        run_kernel(
            _swiglu_rows_kernel,
            (rows, cdiv(inter, block)),
            gate_up,
            act,
            inter,
            gate_up.stride(0),
            act.stride(0),
            BLOCK=block,
            num_warps=4,
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
        run_kernel(
            _swiglu_rows_backward_kernel,
            (rows,),
            gate_up,
            d_act,
            row_scale,
            d_gate_up,
            act_scaled,
            d_row_scale,
            inter,
            gate_up.stride(0),
            d_act.stride(0),
            d_gate_up.stride(0),
            act_scaled.stride(0),
            BLOCK=min(_MAX_BLOCK, next_power_of_2(inter)),
            num_warps=4,
        )
    return d_gate_up, act_scaled, d_row_scale
