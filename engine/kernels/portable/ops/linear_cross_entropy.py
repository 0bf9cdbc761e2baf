"""Chunked linear cross-entropy: ``loss(hidden @ weight.T, targets)`` and its gradients, one chunk of rows at a time.

The op ``engine::linear_cross_entropy`` computes, in one forward pass over chunks of rows: the logits of the
chunk (one GEMM in the input dtype), the per-row loss and, in place of those logits, their gradient (a
*chunk loss*, the only device-specific step: plain torch here, a Triton kernel on CUDA, torch_npu on Ascend),
then the chunk's hidden-state gradient (one GEMM) and its share of the weight gradient (one GEMM accumulated
over chunks). The full ``[N, V]`` logits never exist. The gradients are kept for backward, which only scales them
by the incoming gradient, so a training step runs three GEMMs over the vocabulary, as the unfused head does.

When every row fits one chunk (a ``chunk_bytes`` budget as large as the logits), the weight-gradient GEMM moves
to backward instead: the chunk buffer, holding the logits gradient, is kept, and backward multiplies it by the
hidden states scaled by the incoming gradient. That spares a pass scaling the ``V x H`` weight gradient (the
incoming gradient is not known in forward) and costs no peak memory: the buffer and the weight gradient exist
together once either way, and the buffer replaces the weight gradient among the saved tensors.

Memory, with ``N`` rows, vocabulary ``V``, hidden size ``H``, ``e`` bytes per element of the input dtype and
``b = e + t`` bytes per logit (``t``: the chunk loss's fp32 temporaries per logit, 0 for the in-place Triton
kernel, 12 for the torch one):

* rows per chunk ``R = min(N, max(64, floor(chunk_bytes / (V * b) / 64) * 64))``; the chunks are then balanced
  (``ceil(N / R)`` chunks of ``ceil(N / chunks)`` rows rounded up to a multiple of 64, never more than ``R``),
  so the chunk buffers stay within ``chunk_bytes`` (above it only when 64 rows alone exceed it);
* plus the gradients kept for backward: ``N * H * e`` (hidden) and ``V * H * e`` (weight), and while the
  forward runs a ``V * H * 4`` fp32 weight-gradient accumulator (``fp32_accumulate``; none for fp32 weights);
  with one chunk, the chunk buffer is kept instead of the weight gradient (no accumulator);
* plus ``N * 4`` bytes of per-row losses.

The op is opaque to Dynamo (a ``torch.library`` custom op with a fake implementation and registered autograd),
so ``torch.compile`` traces it without a graph break and never unrolls the chunk loop.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kernels.kinds.linear_cross_entropy import DEFAULT_CHUNK_MIB

ROW_ALIGN = 64

# (logits [R, V] in/out, targets [R], denominator (0-d fp32), row_loss [R] fp32 out, ignore_index, softcap,
#  with_grad): writes each row's loss (0 for ignored rows) and, with_grad, d(loss)/d(logits) over the logits.
ChunkLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, "float | None", bool], None]


@dataclass(frozen=True)
class ChunkLoss:
    fn: ChunkLossFn
    temp_bytes_per_logit: int  # fp32 temporaries the chunk loss allocates per logit, beyond the logits buffer


CHUNK_LOSSES: dict[str, ChunkLoss] = {}


def register_chunk_loss(name: str, fn: ChunkLossFn, temp_bytes_per_logit: int) -> None:
    """Make a device's chunk loss available to the op under ``name`` (its kernel class passes the name)."""
    CHUNK_LOSSES[name] = ChunkLoss(fn, temp_bytes_per_logit)


def torch_chunk_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    denom: torch.Tensor,
    row_loss: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    with_grad: bool,
) -> None:
    """The chunk loss in plain torch ops (any device), fp32 math; the gradient is cast into ``logits``."""
    x = logits.float()
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = tanh * softcap
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    row_loss.copy_(torch.where(valid, lse - picked, 0.0))
    if not with_grad:
        return
    grad = x.sub_(lse[:, None]).exp_()  # softmax; x is a temporary or the logits themselves (overwritten anyway)
    grad.scatter_add_(1, safe[:, None], -valid.to(grad.dtype)[:, None])
    grad.mul_(torch.where(valid, denom.reciprocal(), 0.0)[:, None])
    if tanh is not None:
        grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))
    if grad.data_ptr() != logits.data_ptr():
        logits.copy_(grad)


register_chunk_loss("torch", torch_chunk_loss, temp_bytes_per_logit=12)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_rows(rows: int, vocab: int, bytes_per_logit: int, budget_bytes: int) -> int:
    """Rows per chunk under the memory budget, balanced over the chunks (see the module docstring)."""
    if rows <= 0:
        return 1
    fit = max(ROW_ALIGN, budget_bytes // max(1, vocab * bytes_per_logit) // ROW_ALIGN * ROW_ALIGN)
    if fit >= rows:
        return rows
    per_chunk = _ceil_div(rows, _ceil_div(rows, fit))
    return min(fit, _ceil_div(per_chunk, ROW_ALIGN) * ROW_ALIGN)


@functools.cache
def _fp32_out_matmul(device: torch.device) -> bool:
    """Whether ``addmm(..., out_dtype=float32)`` takes half-precision inputs on this device (CUDA, torch >= 2.8)."""
    if device.type != "cuda":
        return False
    try:  # no read-back: this may first run while a CUDA graph is being captured
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        acc = torch.zeros(2, 2, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` on the first chunk, else ``acc += a @ b``, accumulating in ``acc``'s dtype."""
    beta = 0.0 if first else 1.0
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, beta=beta)
    elif _fp32_out_matmul(acc.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for the block where it is enabled (the op's GEMMs run in the dtypes they are given)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("engine::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    denom: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_bytes: int,
    impl: str,
    grad_hidden: bool,
    grad_weight: bool,
    fp32_accumulate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d hidden, d loss / d weight); a gradient not asked for is an empty tensor. When the
    weight gradient is deferred (:func:`defers_weight_grad`) the third is d loss / d logits ``[N, V]`` instead."""
    # the caller already cast to the autocast dtype; the GEMMs and the accumulation must run as written
    with _autocast_off(hidden.device.type):
        chunk_loss = CHUNK_LOSSES[impl]
        hidden = hidden.contiguous()
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = _rows_per_chunk(hidden, weight, chunk_bytes, impl)
        deferred = defers_weight_grad(hidden, weight, chunk_bytes, impl, grad_weight)
        row_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
        acc_dtype = torch.float32 if fp32_accumulate and grad_weight else weight.dtype
        in_loop = grad_weight and not deferred
        d_weight = torch.empty(weight.shape, dtype=acc_dtype, device=weight.device) if in_loop else None
        if in_loop and n == 0:
            d_weight.zero_()
        buffer = hidden.new_empty(min(rows, n), vocab)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h = hidden[start:end]
            logits = buffer[: end - start]
            torch.mm(h, weight.t(), out=logits)
            with_grad = grad_hidden or grad_weight
            chunk_loss.fn(logits, targets[start:end], denom, row_loss[start:end], ignore_index, softcap, with_grad)
            if grad_hidden:
                torch.mm(logits, weight, out=d_hidden[start:end])
            if in_loop:
                _accumulate(d_weight, logits.t(), h, first=start == 0)
        loss = row_loss.sum() / denom
        if deferred:
            return loss, d_hidden, buffer
        return loss, d_hidden, d_weight.to(weight.dtype) if in_loop else weight.new_empty(0)


def _rows_per_chunk(hidden: torch.Tensor, weight: torch.Tensor, chunk_bytes: int, impl: str) -> int:
    bytes_per_logit = hidden.element_size() + CHUNK_LOSSES[impl].temp_bytes_per_logit
    return chunk_rows(hidden.shape[0], weight.shape[0], bytes_per_logit, chunk_bytes)


def defers_weight_grad(
    hidden: torch.Tensor, weight: torch.Tensor, chunk_bytes: int, impl: str, grad_weight: bool
) -> bool:
    """Whether the weight-gradient GEMM runs in backward: wanted, and every row (at least one) in one chunk."""
    n = hidden.shape[0]
    return grad_weight and 0 < n <= _rows_per_chunk(hidden, weight, chunk_bytes, impl)


@linear_cross_entropy_op.register_fake
def _fake(  # noqa: ANN202
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    denom: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_bytes: int,
    impl: str,
    grad_hidden: bool,
    grad_weight: bool,
    fp32_accumulate: bool,
):
    loss = hidden.new_empty((), dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    if defers_weight_grad(hidden, weight, chunk_bytes, impl, grad_weight):
        return loss, d_hidden, hidden.new_empty(hidden.shape[0], weight.shape[0])
    d_weight = torch.empty_like(weight) if grad_weight else weight.new_empty(0)
    return loss, d_hidden, d_weight


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    _, d_hidden, d_weight = output
    hidden, weight, *_, chunk_bytes, impl, _, grad_weight, _ = inputs
    ctx.deferred = defers_weight_grad(hidden, weight, chunk_bytes, impl, grad_weight)
    ctx.save_for_backward(d_hidden, d_weight, hidden if ctx.deferred else None)
    ctx.mark_non_differentiable(d_hidden, d_weight)
    ctx.grads = (inputs[8], inputs[9])


SCALE_BLOCK = 1 << 24  # elements upcast at a time when a half-precision gradient is scaled in place


def _scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad * scale`` in fp32 math (a 0-d device tensor would otherwise be rounded to the gradient's dtype first).

    In eager the saved gradient is scaled in place, a block at a time (autograd's version check then refuses a
    second backward through it, e.g. ``retain_graph=True``); under tracing, out of place.
    """
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return (grad.float() * scale).to(grad.dtype)
    if grad.dtype == torch.float32:
        return grad.mul_(scale)
    for block in grad.view(-1).split(SCALE_BLOCK):
        block.copy_(block.float().mul_(scale))
    return grad


def _backward(ctx, grad_loss: torch.Tensor, _d_hidden: torch.Tensor, _d_weight: torch.Tensor):  # noqa: ANN001, ANN202
    d_hidden, d_weight, hidden = ctx.saved_tensors
    want_hidden, want_weight = ctx.grads
    if want_weight and ctx.deferred:  # d_weight holds the logits gradient: d loss/d weight = d_logits.T @ hidden
        with _autocast_off(hidden.device.type):
            d_weight = torch.mm(d_weight.t(), (hidden.float() * grad_loss).to(hidden.dtype))
    elif want_weight:
        d_weight = _scaled(d_weight, grad_loss)
    return _scaled(d_hidden, grad_loss) if want_hidden else None, d_weight if want_weight else None, *([None] * 9)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    denom: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    *,
    impl: str = "torch",
    chunk_bytes: int = DEFAULT_CHUNK_MIB << 20,
    fp32_accumulate: bool = True,
) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T, targets)) / denom`` (fp32), with autograd, never holding the full logits.

    ``hidden`` is ``[N, H]``, ``weight`` ``[V, H]`` of the same dtype, ``targets`` ``[N]`` int64 (``ignore_index``
    rows contribute nothing), ``denom`` a 0-d fp32 tensor. Gradients are computed in the forward pass for the
    inputs that require them (none under ``no_grad``).
    """
    grad = torch.is_grad_enabled()
    loss, _, _ = linear_cross_entropy_op(
        hidden,
        weight,
        targets,
        denom,
        ignore_index,
        softcap,
        chunk_bytes,
        impl,
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        fp32_accumulate,
    )
    return loss
