"""Triton embedding gradient as ``engine::embedding`` / ``engine::embedding_backward``: the weight gradient is
written once, in the weight's dtype, with no atomics.

Why: under ``torch.compile``, Inductor decomposes the embedding backward into an fp32 ``[V, H]`` buffer that it
zeroes, accumulates into with atomic adds, then converts to the weight's dtype: 3.1 GB of traffic at a
151,936-token vocabulary and H=2048 (an H200, 8192 tokens: 0.79 ms, against 0.33 ms here).

How: the tokens are sorted once (stable, so the summation order is fixed) and each vocabulary row finds its run
of positions in the sorted order. One pass writes every row of the gradient: the fp32 sum of its tokens' output
gradients, rounded once, or zeros. A row used more than ``CAP`` times (a padding or end-of-text token in a
packed batch) would make one program loop long, so a second launch sums those rows ``BLOCK_T`` tokens at a time
(found from the sorted tokens, no host sync) and the first leaves them alone. ``padding_idx`` rows get zeros.

The forward is ``weight[ids]`` in plain torch, which Inductor fuses with whatever reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.kinds.embedding import INDEX_DTYPES
from engine.kernels.triton.ops.library import KernelOp, run_kernel
from engine.kernels.triton.runtime import cdiv, next_power_of_2

CAP = 8  # tokens per row summed by the row-tile launch; rows used more often go to the heavy-row launch
BLOCK_V = 16  # vocabulary rows per program of the row-tile launch
MAX_BLOCK_H = 256  # columns per program of the row-tile launch
BLOCK_T = 64  # tokens summed at a time by the heavy-row launch
HEAVY_BLOCK_H = 64  # columns per program of the heavy-row launch: more programs share a long run


@triton.jit
def _embedding_grad_rows(
    GRAD,
    stride_g,
    ORDER,
    STARTS,
    OUT,
    n_vocab,
    n_cols,
    padding_idx,
    cap,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rows used at most ``cap`` times: one token per row of the tile per loop step."""
    rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < n_vocab
    col_mask = cols < n_cols
    start = tl.load(STARTS + rows, mask=row_mask, other=0)
    count = tl.load(STARTS + rows + 1, mask=row_mask, other=0) - start
    light = row_mask & (count <= cap)
    count = tl.where(light, count, 0)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k in range(0, tl.max(count, axis=0)):
        used = k < count
        pos = tl.load(ORDER + start + k, mask=used, other=0)
        mask = used[:, None] & col_mask[None, :]
        acc += tl.load(GRAD + pos[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = tl.where((rows == padding_idx)[:, None], 0.0, acc)
    out = OUT + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=light[:, None] & col_mask[None, :])


@triton.jit
def _embedding_grad_heavy(
    GRAD,
    stride_g,
    ORDER,
    SORTED_IDS,
    STARTS,
    OUT,
    n_cols,
    padding_idx,
    cap,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rows used more than ``cap`` times. Such a row's run in the sorted tokens covers a multiple of ``cap + 1``;
    the program at the first such position of the run sums the row, every other program returns."""
    position = tl.program_id(0) * (cap + 1)
    row = tl.load(SORTED_IDS + position)
    start = tl.load(STARTS + row)
    end = tl.load(STARTS + row + 1)
    if (end - start > cap) & (position - (cap + 1) < start):
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_mask = cols < n_cols
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for block in range(start, end, BLOCK_T):
            tokens = block + tl.arange(0, BLOCK_T)
            used = tokens < end
            pos = tl.load(ORDER + tokens, mask=used, other=0)
            mask = used[:, None] & col_mask[None, :]
            grad = tl.load(GRAD + pos[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(grad.to(tl.float32), axis=0)
        acc = tl.where(row == padding_idx, 0.0, acc)
        tl.store(OUT + row.to(tl.int64) * n_cols + cols, acc.to(OUT.dtype.element_ty), mask=col_mask)


def _forward(weight: torch.Tensor, ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    return torch.nn.functional.embedding(ids, weight)


def _backward(grad: torch.Tensor, ids: torch.Tensor, n_vocab: int, padding_idx: int) -> torch.Tensor:
    """d loss / d weight: ``[n_vocab, H]`` in ``grad``'s dtype; ``padding_idx`` < 0 means none."""
    n_cols = int(grad.shape[-1])
    rows = grad.reshape(-1, n_cols)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    flat = ids.reshape(-1)
    out = rows.new_empty(n_vocab, n_cols)
    if n_vocab == 0 or n_cols == 0:
        return out
    keys = flat.to(torch.int32) if n_vocab < 2**31 else flat  # half the radix-sort passes of int64 keys
    sorted_ids, order = torch.sort(keys, stable=True)
    bounds = torch.arange(n_vocab + 1, device=flat.device, dtype=sorted_ids.dtype)
    starts = torch.searchsorted(sorted_ids, bounds)
    block_h = min(MAX_BLOCK_H, next_power_of_2(n_cols))
    col_blocks = cdiv(n_cols, block_h)
    run_kernel(
        _embedding_grad_rows,
        (cdiv(n_vocab, BLOCK_V), col_blocks),
        rows,
        rows.stride(0),
        order,
        starts,
        out,
        n_vocab,
        n_cols,
        padding_idx,
        CAP,
        BLOCK_V=BLOCK_V,
        BLOCK_H=block_h,
        num_warps=4,
    )
    if flat.numel() > CAP:
        heavy_block_h = min(HEAVY_BLOCK_H, next_power_of_2(n_cols))
        run_kernel(
            _embedding_grad_heavy,
            (cdiv(flat.numel(), CAP + 1), cdiv(n_cols, heavy_block_h)),
            rows,
            rows.stride(0),
            order,
            sorted_ids,
            starts,
            out,
            n_cols,
            padding_idx,
            CAP,
            BLOCK_T=BLOCK_T,
            BLOCK_H=heavy_block_h,
            num_warps=4,
        )
    return out


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    weight, ids, padding_idx = inputs
    ctx.save_for_backward(ids)
    ctx.n_vocab, ctx.padding_idx = weight.shape[0], padding_idx


def _backward_formula(ctx, grad):  # noqa: ANN001, ANN202
    (ids,) = ctx.saved_tensors
    return EMBEDDING_BACKWARD(grad, ids, ctx.n_vocab, ctx.padding_idx), None, None


EMBEDDING_BACKWARD = KernelOp("embedding_backward", _backward)
EMBEDDING = KernelOp("embedding", _forward, setup_context=_setup_context, backward=_backward_formula)


def embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``weight[ids]`` with the weight gradient of this module (``padding_idx`` rows get none)."""
    if weight.dim() != 2 or ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"embedding: weight {tuple(weight.shape)} must be 2-D and ids ({ids.dtype}) int32/int64")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return EMBEDDING(weight, ids, -1 if padding_idx is None else int(padding_idx))
