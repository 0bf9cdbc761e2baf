"""Triton rotary embedding as ``engine::rope``: q and k rotated in one launch, any strides, fp32 math.

One program per (batch, position) loads that position's cos/sin once and rotates every q and k head.
``out = x * cos + rotate_half(x) * sin``; the gradient is the inverse (transposed) rotation, the same operator
with ``inverse=True``. Serves transformers' ``apply_rotary_pos_emb`` (outputs promoted with cos/sin's dtype,
like its arithmetic) and the vision tower's ``apply_rotary_pos_emb_vision`` (outputs in q's and k's dtypes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.ops.library import KernelOp, run_kernel
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


def _rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_dtype: torch.dtype,
    k_dtype: torch.dtype,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out) in the given dtypes and q's / k's layouts."""
    q_out = torch.empty_like(q, dtype=q_dtype)
    k_out = torch.empty_like(k, dtype=k_dtype)
    batch, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    half = dim // 2
    if batch * seq == 0:
        return q_out, k_out
    run_kernel(
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
        BACKWARD=inverse,
        num_warps=4 if n_q * dim <= 4096 else 8,
    )
    return q_out, k_out


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, cos, sin, _, _, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtypes, ctx.inverse = (q.dtype, k.dtype), inverse


def _backward_formula(ctx, dq_out, dk_out):  # noqa: ANN001, ANN202
    cos, sin = ctx.saved_tensors
    dq, dk = ROPE(dq_out, dk_out, cos, sin, *ctx.dtypes, not ctx.inverse)
    return dq, dk, None, None, None, None, None


ROPE = KernelOp("rope", _rotate, setup_context=_setup_context, backward=_backward_formula)


def check_rope_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """One-line ``ValueError`` unless q [B, Hq, S, D], k [B, Hk, S, D], cos/sin [B or 1, S, D], D even."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-D [batch, heads, seq, head_dim]")
    if cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be [batch or 1, seq, dim]")
    batch, _, seq, dim = q.shape
    if dim % 2:
        raise ValueError(f"rope: head_dim {dim} is odd; rotate-half needs an even head_dim")
    if k.shape[-1] != dim or cos.shape[-1] != dim:
        raise ValueError(f"rope: rotary dims differ: q {dim}, k {k.shape[-1]}, cos/sin {cos.shape[-1]} (no partial)")
    if k.shape[0] != batch or k.shape[2] != seq or cos.shape[1] != seq or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"rope: batch/seq of q {tuple(q.shape)}, k {tuple(k.shape)} and cos/sin {tuple(cos.shape)} do not match"
        )
    if not all(t.dtype.is_floating_point for t in (q, k, cos, sin)):
        raise ValueError("rope: q, k, cos and sin must be floating point")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope: cos/sin require grad, but the kernel computes no gradient for them")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb``: rotate q [B, Hq, S, D] and k [B, Hk, S, D] by cos/sin [B or 1, S, D]."""
    check_rope_args(q, k, cos, sin)
    return rope_checked(q, k, cos, sin)


def rope_checked(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope` for arguments that already passed :func:`check_rope_args` (the kernel class checks them in
    ``supports`` on every call; checking twice costs host time on a path that runs hundreds of times a step)."""
    angles = torch.promote_types(cos.dtype, sin.dtype)
    return ROPE(q, k, cos, sin, torch.promote_types(q.dtype, angles), torch.promote_types(k.dtype, angles), False)


def _vision_as_4d(q, k, cos, sin):  # noqa: ANN001, ANN202
    """[S, H, D] q/k and [S, D] cos/sin as the kernel's [1, H, S, D] and [1, S, D] views."""
    return q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos.unsqueeze(0), sin.unsqueeze(0)


def check_vision_rope_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """One-line ``ValueError`` unless q [S, Hq, D], k [S, Hk, D], cos/sin [S, D], D even."""
    if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2 or sin.dim() != 2:
        raise ValueError(
            f"vision_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [seq, heads, dim], "
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} [seq, dim]"
        )
    check_rope_args(*_vision_as_4d(q, k, cos, sin))


def vision_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb_vision``: q/k [S, H, D], cos/sin [S, D]; fp32 math, outputs in q's / k's dtypes."""
    check_vision_rope_args(q, k, cos, sin)
    return vision_rope_checked(q, k, cos, sin)


def vision_rope_checked(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vision_rope` for arguments that already passed :func:`check_vision_rope_args`."""
    q_out, k_out = ROPE(*_vision_as_4d(q, k, cos, sin), q.dtype, k.dtype, False)
    return q_out.transpose(1, 2).squeeze(0), k_out.transpose(1, 2).squeeze(0)
