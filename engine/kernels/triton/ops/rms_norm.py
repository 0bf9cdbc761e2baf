"""Triton RMSNorm, forward and backward, with transformers' llama and gemma casting conventions.

Forward reads x once and writes y and a per-row fp32 rstd. Backward reads x, dy, rstd and writes dx; the
weight gradient is accumulated in fp32 per program of a persistent grid, then summed over programs in program
order (deterministic): by the last program to finish for rows up to TAIL_REDUCE_MAX_COLUMNS wide (one launch),
else by a second small launch. Pointer offsets are int64, so tensors over 2**31 elements are safe.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.kernels.triton.launch import launch
from engine.kernels.triton.runtime import next_power_of_2, program_count

MAX_FUSED_COLUMNS = 65536
# Backward launch shape, by row width: rows per loop step, warps, and programs per SM of the persistent grid.
# Tuned on an H100 by the GPU time of fwd+bwd (CUDA-graph replay): ``benchmarks/bench_kernels.py --sweep-rms-norm``.
# ``two_pass``: dx in one launch of one row block per program, then dw by a column reduction re-reading x and dy.
BWD_TUNING: dict[str, dict[str, int]] = {
    "narrow": {"block_m": 64, "num_warps": 4, "programs_per_sm": 2, "two_pass": 0},  # rows of <= 512 columns
    "wide": {"block_m": 2, "num_warps": 8, "programs_per_sm": 2, "two_pass": 0},
}
DW_BLOCK_C, DW_BLOCK_R = 128, 32
# Up to this width (block of columns) the last program of the backward sums the dw shares itself.
TAIL_REDUCE_MAX_COLUMNS = 512


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
    DW,
    COUNTER,
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
    TAIL_REDUCE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dx for every row (persistent loop); with COMPUTE_DW, also this program's fp32 share of dw.

    With TAIL_REDUCE the program that finishes last (COUNTER, reset to 0 afterwards) sums the shares in
    program order into DW, so dw needs no second launch and stays deterministic.
    """
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
        if TAIL_REDUCE:
            tl.debug_barrier()  # every thread's share is stored before the release below
            finished = tl.atomic_add(COUNTER, 1, sem="acq_rel")
            if finished == n_programs - 1:
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for r0 in range(0, n_programs, BLOCK_R):
                    shares = r0 + tl.arange(0, BLOCK_R)
                    mask = (shares[:, None] < n_programs) & col_mask[None, :]
                    part = tl.load(
                        DW_PARTIAL + shares[:, None] * n_cols + cols[None, :],
                        mask=mask,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    total += tl.sum(part, axis=0)
                tl.store(DW + cols, total.to(DW.dtype.element_ty), mask=col_mask)
                tl.atomic_xchg(COUNTER, 0)


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


@functools.cache
def _bwd_config(n_cols: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, num_warps, programs_per_sm, two_pass) for the backward."""
    block_n = next_power_of_2(n_cols)
    tuning = BWD_TUNING["narrow" if block_n <= 512 else "wide"]
    block_m = max(1, min(tuning["block_m"], 16384 // block_n))
    return block_m, block_n, tuning["num_warps"], tuning["programs_per_sm"], bool(tuning.get("two_pass", 0))


@functools.cache
def _fwd_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): several rows per program for narrow rows like head_dim 128."""
    block_n = next_power_of_2(n_cols)
    block_m = max(1, min(64, 4096 // block_n))
    num_warps = 4 if block_n * block_m <= 4096 else 8 if block_n * block_m <= 16384 else 16
    return block_m, block_n, num_warps


def set_bwd_tuning(key: str, tuning: dict[str, int]) -> None:
    """Replace one row of BWD_TUNING (``narrow`` or ``wide``); used by the benchmark's sweep."""
    BWD_TUNING[key] = dict(tuning)
    _bwd_config.cache_clear()
    _bwd_launch_shape.cache_clear()


@functools.lru_cache(maxsize=1024)
def _bwd_launch_shape(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int, int, int, int, bool]:
    """(programs, BLOCK_M, BLOCK_N, num_warps, programs_per_sm, two_pass) of the backward launch."""
    block_m, block_n, warps, per_sm, two_pass = _bwd_config(n_cols)
    if two_pass:
        programs = triton.cdiv(n_rows, block_m)  # one row block each: the loop runs once
    else:
        programs = max(1, min(program_count(device, per_sm=per_sm), triton.cdiv(n_rows, block_m)))
    return programs, block_m, block_n, warps, per_sm, two_pass


_tail_workspaces: dict[tuple[str, int | None, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _tail_workspace(device: torch.device, partial_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 counter, fp32 shares) kept per device and stream; the kernel leaves the counter at 0.

    Launches on one stream run in order, so reusing them there is safe; another stream gets its own.
    Under CUDA-graph capture both are fresh graph allocations, the counter zeroed by a captured memset.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        return counter, torch.empty(partial_numel, dtype=torch.float32, device=device)
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    entry = _tail_workspaces.get(key)
    if entry is None or entry[1].numel() < partial_numel:
        counter = entry[0] if entry is not None else torch.zeros(1, dtype=torch.int32, device=device)
        entry = (counter, torch.empty(partial_numel, dtype=torch.float32, device=device))
        _tail_workspaces[key] = entry
    return entry


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are packed (the usual case), else a packed copy; the kernels index rows by numel."""
    return t if t.is_contiguous() else t.contiguous()


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool):
    """Launch the forward; returns (y, packed x, rstd)."""
    x = _as_rows(x)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    if gemma or weight.dtype == x.dtype:
        y = torch.empty_like(x)
    else:
        y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = x.new_empty(n_rows, dtype=torch.float32)
    block_m, block_n, warps = _fwd_config(n_cols)
    launch(
        _rms_norm_fwd,
        (triton.cdiv(n_rows, block_m),),
        x,
        weight,
        y,
        rstd,
        n_cols,
        n_cols,
        n_rows,
        n_cols,
        eps,
        offset,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GEMMA=gemma,
        num_warps=warps,
    )
    return y, x, rstd


def _backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dy: torch.Tensor,
    offset: float,
    gemma: bool,
    want_dw: bool,
):
    """(dx, dw or None) for packed x and its saved rstd."""
    dy = _as_rows(dy)
    n_cols = x.shape[-1]
    n_rows = rstd.shape[0]
    dx = torch.empty_like(x)
    programs, block_m, block_n, warps, per_sm, two_pass = _bwd_launch_shape(n_rows, n_cols, x.device)
    fused_dw = want_dw and not two_pass
    tail = fused_dw and block_n <= TAIL_REDUCE_MAX_COLUMNS
    dw = torch.empty_like(weight) if tail else None
    if tail:
        counter, partial = _tail_workspace(x.device, programs * n_cols)
    else:
        partial = x.new_empty((programs if fused_dw else 1, n_cols), dtype=torch.float32)
        counter = partial
    launch(
        _rms_norm_bwd,
        (programs,),
        x,
        weight,
        dy,
        rstd,
        dx,
        partial,
        dw if tail else dx,
        counter,
        n_cols,
        n_cols,
        n_cols,
        n_rows,
        n_cols,
        offset,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GEMMA=gemma,
        COMPUTE_DW=fused_dw,
        TAIL_REDUCE=tail,
        BLOCK_R=max(1, 4096 // block_n),
        num_warps=warps,
    )
    if not want_dw or tail:
        return dx, dw
    if two_pass:
        col_blocks = triton.cdiv(n_cols, DW_BLOCK_C)
        chunks = max(1, min(program_count(x.device, per_sm=per_sm) // col_blocks, n_rows // DW_BLOCK_R))
        rows_per_chunk = triton.cdiv(triton.cdiv(n_rows, chunks), DW_BLOCK_R) * DW_BLOCK_R
        chunks = triton.cdiv(n_rows, rows_per_chunk)
        partial = torch.empty(chunks, n_cols, dtype=torch.float32, device=x.device)
        launch(
            _rms_norm_bwd_dw,
            (col_blocks, chunks),
            x,
            dy,
            rstd,
            partial,
            n_cols,
            n_cols,
            n_rows,
            n_cols,
            rows_per_chunk,
            BLOCK_R=DW_BLOCK_R,
            BLOCK_C=DW_BLOCK_C,
            GEMMA=gemma,
            num_warps=4,
        )
    dw = torch.empty_like(weight)
    block_c = min(256, block_n)
    launch(
        _sum_partials,
        (triton.cdiv(n_cols, block_c),),
        partial,
        dw,
        partial.shape[0],
        n_cols,
        BLOCK_R=32,
        BLOCK_C=block_c,
    )
    return dx, dw


class TritonRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool) -> torch.Tensor:
        y, x_rows, rstd = _forward(x, weight, eps, offset, gemma)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.offset, ctx.gemma = offset, gemma
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x_rows, weight, rstd, dy, ctx.offset, ctx.gemma, ctx.needs_input_grad[1])
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, gemma: bool = False):
    """``y = (w + offset) * x * rsqrt(mean(x^2) + eps)`` over the last dim, with autograd.

    Without a gradient to track (inference, ``no_grad``) the kernel is launched without an autograd node.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return TritonRMSNormFunction.apply(x, weight, eps, offset, gemma)
    return _forward(x, weight, eps, offset, gemma)[0]
