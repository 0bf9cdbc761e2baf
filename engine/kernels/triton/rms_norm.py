"""Triton RMSNorm, forward and backward, with transformers' llama and gemma casting conventions.

Forward reads x once and writes y and a per-row fp32 rstd. Backward reads x, dy, rstd and writes dx; the
weight gradient is accumulated in fp32 per program of a persistent grid, then summed over programs.
Pointer offsets are int64, so tensors over 2**31 elements are safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.runtime import next_power_of_2, program_count

MAX_FUSED_COLUMNS = 65536
# Backward launch shape, by row width: rows per loop step, warps, and programs per SM of the persistent grid.
# Tuned on an H100 with ``benchmarks/bench_kernels.py --sweep-rms-norm``.
# ``two_pass``: dx in one launch of one row block per program, then dw by a column reduction re-reading x and dy.
BWD_TUNING: dict[str, dict[str, int]] = {
    "narrow": {"block_m": 8, "num_warps": 4, "programs_per_sm": 8, "two_pass": 0},  # rows of <= 512 columns
    "wide": {"block_m": 2, "num_warps": 8, "programs_per_sm": 2, "two_pass": 0},
}
DW_BLOCK_C, DW_BLOCK_R = 128, 32


@triton.jit
def _weight_grad_term(dy, normed, x_dtype: tl.constexpr, GEMMA: tl.constexpr):
    """dy * normed as transformers sees it: llama casting rounds normed to the input dtype first."""
    if GEMMA:
        return dy * normed
    return dy * normed.to(x_dtype).to(tl.float32)


@triton.jit
def _rms_norm_fwd(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GEMMA: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    normed = x * rstd[:, None]
    if not GEMMA:  # transformers rounds the normalised input to its dtype before scaling by the weight
        normed = normed.to(X.dtype.element_ty).to(tl.float32)
    y = normed * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd(
    X,
    W,
    DY,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_x,
    stride_dy,
    stride_dx,
    n_rows,
    n_cols,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GEMMA: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """dx for every row (persistent loop); with COMPUTE_DW, also this program's fp32 share of dw."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(pid * BLOCK_M, n_rows, n_programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if COMPUTE_DW:
            dw += _weight_grad_term(dy, normed, X.dtype.element_ty, GEMMA)
        dnormed = dy * w[None, :]
        dot = tl.sum(dnormed * normed, axis=1) / n_cols
        dx = (dnormed - normed * dot[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


@triton.jit
def _rms_norm_bwd_dw(
    X,
    DY,
    RSTD,
    DW_PARTIAL,
    stride_x,
    stride_dy,
    n_rows,
    n_cols,
    rows_per_chunk,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GEMMA: tl.constexpr,
):
    """Second pass of the two-pass backward: DW_PARTIAL[chunk, cols] = sum over the chunk's rows of dy * normed."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    col_mask = cols < n_cols
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = chunk * rows_per_chunk
    last = tl.minimum(first + rows_per_chunk, n_rows)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        normed = x * tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        acc += tl.sum(_weight_grad_term(dy, normed, X.dtype.element_ty, GEMMA), axis=0)
    tl.store(DW_PARTIAL + chunk.to(tl.int64) * n_cols + cols, acc, mask=col_mask)


@triton.jit
def _sum_partials(PARTIAL, OUT, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[c] = sum_r PARTIAL[r, c], written in OUT's dtype (the weight gradient)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        acc += tl.sum(tl.load(PARTIAL + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=col_mask)


def _bwd_config(n_cols: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, num_warps, programs_per_sm, two_pass) for the backward."""
    block_n = next_power_of_2(n_cols)
    tuning = BWD_TUNING["narrow" if block_n <= 512 else "wide"]
    block_m = max(1, min(tuning["block_m"], 16384 // block_n))
    return block_m, block_n, tuning["num_warps"], tuning["programs_per_sm"], bool(tuning.get("two_pass", 0))


def _block_rows(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): several rows per program for narrow rows like head_dim 128."""
    block_n = next_power_of_2(n_cols)
    block_m = max(1, min(64, 4096 // block_n))
    num_warps = 4 if block_n * block_m <= 4096 else 8 if block_n * block_m <= 16384 else 16
    return block_m, block_n, num_warps


class TritonRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        x2 = x.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block_m, block_n, warps = _block_rows(n_cols)
        grid = (triton.cdiv(x2.shape[0], block_m),)
        _rms_norm_fwd[grid](
            x2,
            weight,
            y,
            rstd,
            x2.stride(0),
            y.stride(0),
            x2.shape[0],
            n_cols,
            eps,
            offset,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            GEMMA=gemma,
            num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.gemma, ctx.shape = offset, gemma, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        block_m, block_n, warps, per_sm, two_pass = _bwd_config(n_cols)
        want_dw = ctx.needs_input_grad[1]
        if two_pass:
            programs = triton.cdiv(n_rows, block_m)  # one row block each: the loop runs once
        else:
            programs = max(1, min(program_count(x2.device, per_sm=per_sm), triton.cdiv(n_rows, block_m)))
        fused_dw = want_dw and not two_pass
        partial = torch.empty(programs if fused_dw else 1, n_cols, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](
            x2,
            weight,
            dy2,
            rstd,
            dx,
            partial,
            x2.stride(0),
            dy2.stride(0),
            dx.stride(0),
            n_rows,
            n_cols,
            ctx.offset,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            GEMMA=ctx.gemma,
            COMPUTE_DW=fused_dw,
            num_warps=warps,
        )
        dw = None
        if want_dw:
            if two_pass:
                col_blocks = triton.cdiv(n_cols, DW_BLOCK_C)
                chunks = max(1, min(program_count(x2.device, per_sm=per_sm) // col_blocks, n_rows // DW_BLOCK_R))
                rows_per_chunk = triton.cdiv(triton.cdiv(n_rows, chunks), DW_BLOCK_R) * DW_BLOCK_R
                chunks = triton.cdiv(n_rows, rows_per_chunk)
                partial = torch.empty(chunks, n_cols, dtype=torch.float32, device=x2.device)
                _rms_norm_bwd_dw[(col_blocks, chunks)](
                    x2,
                    dy2,
                    rstd,
                    partial,
                    x2.stride(0),
                    dy2.stride(0),
                    n_rows,
                    n_cols,
                    rows_per_chunk,
                    BLOCK_R=DW_BLOCK_R,
                    BLOCK_C=DW_BLOCK_C,
                    GEMMA=ctx.gemma,
                    num_warps=4,
                )
            dw = torch.empty_like(weight)
            block_c = min(256, block_n)
            _sum_partials[(triton.cdiv(n_cols, block_c),)](
                partial, dw, partial.shape[0], n_cols, BLOCK_R=32, BLOCK_C=block_c
            )
        return dx.view(ctx.shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, gemma: bool = False):
    """``y = (w + offset) * x * rsqrt(mean(x^2) + eps)`` over the last dim, with autograd."""
    return TritonRMSNormFunction.apply(x, weight, eps, offset, gemma)
