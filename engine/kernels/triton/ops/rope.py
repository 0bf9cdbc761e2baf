"""Triton rotary embedding: q and k rotated in one launch, any strides, fp32 math, forward and backward.

One program per (batch, position) loads that position's cos/sin once and rotates every q and k head.
``out = x * cos + rotate_half(x) * sin``; the backward applies the transposed rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.launch import launch
from engine.kernels.triton.runtime import next_power_of_2


@triton.jit
def _rotate_heads(
    X,
    Y,
    x_off,
    y_off,
    sxh,
    sxd,
    syh,
    syd,
    c1,
    c2,
    s1,
    s2,
    n_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_heads) & (dims[None, :] < half)
    hx = heads[:, None].to(tl.int64)
    x1p = X + x_off + hx * sxh + dims[None, :] * sxd
    x1 = tl.load(x1p, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1p + half * sxd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y1p = Y + y_off + heads[:, None].to(tl.int64) * syh + dims[None, :] * syd
    tl.store(y1p, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y1p + half * syd, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    sqob,
    sqoh,
    sqos,
    sqod,
    skob,
    skoh,
    skos,
    skod,
    scb,
    scs,
    scd,
    ssb,
    sss,
    ssd,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    s = (pid % seq_len).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < half
    cp = COS + b * scb + s * scs + dims * scd
    sp = SIN + b * ssb + s * sss + dims * ssd
    c1 = tl.load(cp, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cp + half * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sp, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sp + half * ssd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        Q,
        QO,
        b * sqb + s * sqs,
        b * sqob + s * sqos,
        sqh,
        sqd,
        sqoh,
        sqod,
        c1,
        c2,
        s1,
        s2,
        n_q_heads,
        half,
        BLOCK_HQ,
        BLOCK_D,
        BACKWARD,
    )
    _rotate_heads(
        K,
        KO,
        b * skb + s * sks,
        b * skob + s * skos,
        skh,
        skd,
        skoh,
        skod,
        c1,
        c2,
        s1,
        s2,
        n_k_heads,
        half,
        BLOCK_HK,
        BLOCK_D,
        BACKWARD,
    )


def _cos_strides(cos: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a [B or 1, S, D] cos/sin; a broadcast batch gets stride 0."""
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1), cos.stride(2)


def _launch(q, k, cos, sin, q_out, k_out, backward: bool) -> None:
    batch, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    half = dim // 2
    launch(
        _rope_kernel,
        (batch * seq,),
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *_cos_strides(cos),
        *_cos_strides(sin),
        seq,
        n_q,
        n_k,
        half,
        BLOCK_HQ=next_power_of_2(n_q),
        BLOCK_HK=next_power_of_2(n_k),
        BLOCK_D=next_power_of_2(half),
        BACKWARD=backward,
        num_warps=4 if n_q * dim <= 4096 else 8,
    )


def _rotate(q, k, cos, sin, out_dtype):
    q_out = torch.empty_like(q, dtype=out_dtype)
    k_out = torch.empty_like(k, dtype=out_dtype)
    _launch(q, k, cos, sin, q_out, k_out, backward=False)
    return q_out, k_out


class TritonRoPEFunction(torch.autograd.Function):
    """q: [B, Hq, S, D], k: [B, Hk, S, D] (any strides), cos/sin: [B or 1, S, D]."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, out_dtype):
        q_out, k_out = _rotate(q, k, cos, sin, out_dtype)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq = torch.empty_like(dq_out, dtype=ctx.dtypes[0])
        dk = torch.empty_like(dk_out, dtype=ctx.dtypes[1])
        _launch(dq_out, dk_out, cos, sin, dq, dk, backward=True)
        return dq, dk, None, None, None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_dtype: torch.dtype | None = None,
):
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] by cos/sin [B or 1, S, D] in one launch."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return TritonRoPEFunction.apply(q, k, cos, sin, out_dtype or q.dtype)
    return _rotate(q, k, cos, sin, out_dtype or q.dtype)
