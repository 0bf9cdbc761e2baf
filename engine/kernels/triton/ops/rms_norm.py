"""Triton RMSNorm as ``engine::rms_norm`` / ``engine::rms_norm_backward``, with transformers' llama and gemma
casting conventions.

Forward reads x once and writes y and a per-row fp32 rstd. Rows may have any stride (a tensor whose columns
are not unit-stride is copied first); the weight may have any stride. Backward reads x, dy, rstd and writes dx; the
weight gradient is accumulated in fp32 per program of a persistent grid, then summed over programs in program
order (deterministic): by the last program to finish for rows up to TAIL_REDUCE_MAX_COLUMNS wide (one launch),
else by a second small launch. Pointer offsets are int64, so tensors over 2**31 elements are safe.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.kernels.triton.ops.library import KernelOp, is_real, run_kernel, unused_pointer
from engine.kernels.triton.rms_norm import MAX_COLUMNS
from engine.kernels.triton.runtime import cdiv, next_power_of_2, program_count

# Backward launch shape, by row width: rows per loop step, warps, and programs per SM of the persistent grid.
# Tuned on an H100 by the GPU time of fwd+bwd (CUDA-graph replay): ``benchmarks/bench_kernels.py --sweep-rms-norm``.
# ``two_pass``: dx in one launch of one row block per program, then dw by a column reduction re-reading x and dy.
# The H100 tuning below does not pick it; it stays as the sweep's alternative for other GPUs and widths (tested).
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
    stride_w,
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
    w = tl.load(W + cols * stride_w, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
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
    stride_w,
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
    w = tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32) + offset
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


_tail_workspaces: dict[tuple[str, int | None, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _tail_workspace(like: torch.Tensor, partial_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 counter, fp32 shares): reused per device and stream in eager, fresh when traced or captured.

    The kernel leaves the counter at 0 and launches on one stream run in order, so eager calls there can
    share it; another stream gets its own. A traced call (compile) or a CUDA-graph capture allocates both,
    the counter zeroed by an op of the graph, so no state outlives one call or one replay.
    """
    device = like.device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or not is_real(like):
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


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as [rows, n_cols] with unit column stride: a view where possible (any row stride), else a copy."""
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, per-row fp32 rstd)."""
    n_cols = int(x.shape[-1])
    x_rows = _as_rows(x, n_cols)
    n_rows = x_rows.shape[0]
    out_dtype = x.dtype if gemma or weight.dtype == x.dtype else torch.promote_types(x.dtype, weight.dtype)
    # *_like / new_* allocations: the host path runs hundreds of times a step, and these skip building a device
    y = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    rstd = x.new_empty(n_rows, dtype=torch.float32)
    if n_rows == 0:
        return y, rstd
    block_m, block_n, warps = _fwd_config(n_cols)
    run_kernel(
        _rms_norm_fwd,
        (cdiv(n_rows, block_m),),
        x_rows,
        weight,
        y,
        rstd,
        x_rows.stride(0),
        n_cols,
        weight.stride(0),
        n_rows,
        n_cols,
        eps,
        offset,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GEMMA=gemma,
        num_warps=warps,
    )
    return y, rstd


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    gemma: bool,
    want_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); dw is an empty placeholder when not wanted."""
    n_cols = int(x.shape[-1])
    x_rows, dy_rows = _as_rows(x, n_cols), _as_rows(dy, n_cols)
    n_rows = x_rows.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw = weight.new_empty(n_cols if want_dw else 0)
    if n_rows == 0:
        return dx, dw.zero_()
    block_m, block_n, warps, per_sm, two_pass = _bwd_config(n_cols)
    if two_pass:
        programs = cdiv(n_rows, block_m)  # one row block each: the loop runs once
    else:
        programs = max(1, min(program_count(x.device, per_sm=per_sm), cdiv(n_rows, block_m)))
    fused_dw = want_dw and not two_pass
    tail = fused_dw and block_n <= TAIL_REDUCE_MAX_COLUMNS
    if tail:
        counter, partial = _tail_workspace(x_rows, programs * n_cols)
    elif fused_dw:
        partial, counter = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device), unused_pointer(rstd)
    else:
        partial, counter = unused_pointer(rstd), unused_pointer(rstd)
    run_kernel(
        _rms_norm_bwd,
        (programs,),
        x_rows,
        weight,
        dy_rows,
        rstd,
        dx,
        partial,
        dw if tail else unused_pointer(dx),
        counter,
        x_rows.stride(0),
        dy_rows.stride(0),
        n_cols,
        weight.stride(0),
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
        col_blocks = cdiv(n_cols, DW_BLOCK_C)
        chunks = max(1, min(program_count(x.device, per_sm=per_sm) // col_blocks, n_rows // DW_BLOCK_R))
        rows_per_chunk = cdiv(cdiv(n_rows, chunks), DW_BLOCK_R) * DW_BLOCK_R
        chunks = cdiv(n_rows, rows_per_chunk)
        partial = torch.empty(chunks, n_cols, dtype=torch.float32, device=x.device)
        run_kernel(
            _rms_norm_bwd_dw,
            (col_blocks, chunks),
            x_rows,
            dy_rows,
            rstd,
            partial,
            x_rows.stride(0),
            dy_rows.stride(0),
            n_rows,
            n_cols,
            rows_per_chunk,
            BLOCK_R=DW_BLOCK_R,
            BLOCK_C=DW_BLOCK_C,
            GEMMA=gemma,
            num_warps=4,
        )
    block_c = min(256, block_n)
    run_kernel(
        _sum_partials,
        (cdiv(n_cols, block_c),),
        partial,
        dw,
        partial.shape[0],
        n_cols,
        BLOCK_R=32,
        BLOCK_C=block_c,
    )
    return dx, dw


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, _, offset, gemma = inputs
    ctx.mark_non_differentiable(output[1])  # rstd: no zero gradient to materialise in backward
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.gemma = offset, gemma


def _backward_formula(ctx, dy, _drstd):  # noqa: ANN001, ANN202
    x, weight, rstd = ctx.saved_tensors
    want_dw = ctx.needs_input_grad[1]
    dx, dw = RMS_NORM_BACKWARD(dy, x, weight, rstd, ctx.offset, ctx.gemma, want_dw)
    return dx, dw if want_dw else None, None, None, None


RMS_NORM_BACKWARD = KernelOp("rms_norm_backward", _backward)
RMS_NORM = KernelOp("rms_norm", _forward, setup_context=_setup_context, backward=_backward_formula)


def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    """One-line ``ValueError`` unless x [..., N] (0 < N <= MAX_COLUMNS) and weight [N] are floating."""
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if not 0 < x.shape[-1] <= MAX_COLUMNS:
        raise ValueError(f"rms_norm: rows of {x.shape[-1]} columns; the kernel takes 1 to {MAX_COLUMNS}")
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"rms_norm: x ({x.dtype}) and weight ({weight.dtype}) must be floating point")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, gemma: bool = False):
    """``y = (w + offset) * x * rsqrt(mean(x^2) + eps)`` over the last dim, with autograd, any strides."""
    check_rms_norm_args(x, weight)
    return RMS_NORM(x, weight, float(eps), float(offset), bool(gemma))[0]
