"""Triton chunk loss of the fused linear cross-entropy: per-row loss and logits gradient, written in place.

Why chunked cuBLAS GEMMs plus this kernel, rather than one Triton kernel fusing the matmul with an online
softmax: the three vocabulary GEMMs of a training step (logits, hidden gradient, weight gradient) are ~95% of
the head's FLOPs and cuBLAS runs them at close to peak on Hopper, while a fused kernel must either keep a
``[rows, V]`` gradient anyway for the weight-gradient GEMM or recompute the logits in backward (a fourth GEMM).
This kernel is the memory-bound remainder: it reads each logits row twice and writes it once, in place, so the
chunk needs no second buffer.

One program per row: pass 1 is an online log-sum-exp over the row in blocks (fp32), and reads the target logit;
pass 2 writes ``(softmax - onehot) / denominator`` (times ``1 - tanh^2`` under softcapping) back over the row in
the logits dtype, last block first: the blocks pass 1 read last are the likeliest still in L2 (an H200
microbenchmark at 8192 x 151936 bf16: 1.86 ms against 1.92 in row order, 1.16 for a plain copy of the logits).
The order of pass 2 changes no value. 4096-wide blocks measured 1.81 ms, but they change pass 1's summation
order, and a 6-step bf16 FSDP2 run then drifted from the unpatched one by 1.9e-4 instead of 5.3e-5 (session 9,
``benchmarks/README.md``): these blocks keep the loss bit-identical to earlier releases.
Ignored rows get loss 0 and gradient 0. Targets outside ``[0, V)`` that are not ``ignore_index`` are clamped
(transformers raises on them; this kernel does not check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.portable.ops.linear_cross_entropy import register_chunk_loss
from engine.kernels.triton.ops.library import run_kernel
from engine.kernels.triton.runtime import next_power_of_2

MAX_BLOCK = 8192


@triton.jit
def _tanh(x):
    """tanh through sigmoid (available under the interpreter and on every backend)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _chunk_loss_kernel(
    LOGITS,
    stride_row,
    TARGETS,
    ROW_LOSS,
    DENOM,
    vocab,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    picked_col = tl.minimum(tl.maximum(target, 0), vocab - 1)
    cols = tl.arange(0, BLOCK)

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK):
        mask = start + cols < vocab
        x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(mask, x, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    picked = tl.load(base + picked_col).to(tl.float32)
    if HAS_SOFTCAP:
        picked = softcap * _tanh(picked / softcap)
    tl.store(ROW_LOSS + row, tl.where(valid, lse - picked, 0.0))

    if WITH_GRAD:
        scale = tl.where(valid, 1.0 / tl.load(DENOM), 0.0)
        blocks = tl.cdiv(vocab, BLOCK)
        for i in range(0, blocks):
            start = (blocks - 1 - i) * BLOCK
            mask = start + cols < vocab
            x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            grad = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
            grad = grad * scale
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(base + start + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def triton_chunk_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    denom: torch.Tensor,
    row_loss: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    with_grad: bool,
    block: int | None = None,
) -> None:
    """The chunk loss of ``engine.kernels.portable.ops.linear_cross_entropy``, as one Triton launch."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    if logits.stride(1) != 1:
        raise ValueError("triton_chunk_loss: logits rows must be contiguous")
    block = block or min(MAX_BLOCK, next_power_of_2(vocab))
    run_kernel(
        _chunk_loss_kernel,
        (rows,),
        logits,
        logits.stride(0),
        targets,
        row_loss,
        denom,
        vocab,
        ignore_index,
        1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None,
        WITH_GRAD=with_grad,
        BLOCK=block,
        num_warps=16 if block >= 4096 else 4,
    )


register_chunk_loss("triton", triton_chunk_loss, temp_bytes_per_logit=0)
