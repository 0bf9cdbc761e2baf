"""Triton SwiGLU activation ``silu(gate) * up`` as ``engine::swiglu``: one pass each way, fp32 math.

``engine::swiglu_linear`` adds the down projection after it and keeps only gate and up for backward: the
activation (as wide as each of them) is recomputed by the backward pass that needs gate and up anyway, so a
training step holds one ``[tokens, intermediate]`` tensor less per MLP (a quarter of a Qwen2.5 layer's saved
activations). The GEMMs are the ones autograd runs for ``F.linear``, on the same values.

``engine::swiglu_mlp`` is the whole gate/up/down MLP and keeps only its input: backward recomputes gate and
up (one more pair of GEMMs) and writes their gradients over them, so nothing ``[tokens, intermediate]``-sized
survives a forward pass (the ``recompute: projections`` option of the ``swiglu`` kind).

The kernels stream packed elements; gate or up tensors that are not packed (a chunk of a fused gate_up
projection, a transposed view) are copied to packed ones first. Outputs and gradients are packed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.ops.library import KernelOp, is_real, run_kernel
from engine.kernels.triton.runtime import cdiv

BLOCK = 2048


@triton.jit
def silu_mul(a, b):
    """silu(a) * b in the inputs' precision (callers pass fp32)."""
    return a * tl.sigmoid(a) * b


@triton.jit
def silu_mul_backward(a, b, dc):
    """Gradients of silu(a) * b with respect to a and b, given the output gradient dc."""
    sig = tl.sigmoid(a)
    return dc * b * sig * (1.0 + a * (1.0 - sig)), dc * a * sig


@triton.jit
def _swiglu_fwd(A, B, C, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + offs, silu_mul(a, b).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(A, B, DC, DA, DB, n, RECOMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """DA, DB = d(silu(a) * b); with RECOMPUTE, DC is overwritten by silu(a) * b exactly as forward stored it."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    da, db = silu_mul_backward(a, b, dc)
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, db.to(DB.dtype.element_ty), mask=mask)
    if RECOMPUTE:
        tl.store(DC + offs, silu_mul(a, b).to(DC.dtype.element_ty), mask=mask)


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        run_kernel(_swiglu_fwd, (cdiv(n, BLOCK),), gate, up, out, n, BLOCK=BLOCK, num_warps=8)
    return out


def _backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _swiglu_backward(dout.contiguous(), gate, up, recompute=False)


def _swiglu_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, recompute: bool, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up); with ``recompute``, ``dout`` (packed) then holds the forward activation. ``in_place``
    writes the gradients over gate and up (packed, owned by the caller), on real tensors only: a traced launch
    must not name one tensor as two arguments (see ``unused_pointer``)."""
    gate, up = gate.contiguous(), up.contiguous()
    if in_place and is_real(gate):
        dgate, dup = gate, up
    else:
        dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
        dup = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        run_kernel(
            _swiglu_bwd, (cdiv(n, BLOCK),), gate, up, dout, dgate, dup, n, RECOMPUTE=recompute, BLOCK=BLOCK,
            num_warps=8,
        )  # fmt: skip
    return dgate, dup


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _backward_formula(ctx, dout):  # noqa: ANN001, ANN202
    gate, up = ctx.saved_tensors
    return SWIGLU_BACKWARD(dout, gate, up)


SWIGLU_BACKWARD = KernelOp("swiglu_backward", _backward)
SWIGLU = KernelOp("swiglu", _forward, setup_context=_setup_context, backward=_backward_formula)


def _linear_forward(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.nn.functional.linear(_forward(gate, up), weight, bias)


def _linear_backward(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, d weight, d bias); a gradient not wanted is an empty placeholder."""
    dout_rows = dout.reshape(-1, dout.shape[-1])
    d_act = torch.mm(dout_rows, weight).view(gate.shape)  # fresh and packed: the kernel may overwrite it
    dgate, dup = _swiglu_backward(d_act, gate, up, recompute=want_weight)
    d_weight = torch.mm(dout_rows.t(), d_act.view(-1, d_act.shape[-1])) if want_weight else weight.new_empty(0)
    d_bias = dout_rows.sum(0) if want_bias else weight.new_empty(0)
    return dgate, dup, d_weight, d_bias


def _linear_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    gate, up, weight, bias = inputs
    ctx.save_for_backward(gate, up, weight)
    ctx.has_bias = bias is not None


def _linear_backward_formula(ctx, dout):  # noqa: ANN001, ANN202
    gate, up, weight = ctx.saved_tensors
    want_weight = ctx.needs_input_grad[2]
    want_bias = ctx.has_bias and ctx.needs_input_grad[3]
    dgate, dup, d_weight, d_bias = SWIGLU_LINEAR_BACKWARD(dout, gate, up, weight, want_weight, want_bias)
    return dgate, dup, d_weight if want_weight else None, d_bias if want_bias else None


SWIGLU_LINEAR_BACKWARD = KernelOp("swiglu_linear_backward", _linear_backward)
SWIGLU_LINEAR = KernelOp(
    "swiglu_linear", _linear_forward, setup_context=_linear_setup_context, backward=_linear_backward_formula
)


def _mlp_forward(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
) -> torch.Tensor:
    gate = torch.nn.functional.linear(x, w_gate, b_gate)
    up = torch.nn.functional.linear(x, w_up, b_up)
    act = _forward(gate, up)
    del gate, up  # gone before the down GEMM allocates its output
    return torch.nn.functional.linear(act, w_down, b_down)


def _mlp_backward(  # the forward's parameters again: an operator schema takes each tensor by name
    dout: torch.Tensor,
    x: torch.Tensor,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_down: torch.Tensor,
    wanted: list[bool],
) -> list[torch.Tensor]:
    """Gradients for (x, w_gate, b_gate, w_up, b_up, w_down, b_down); one not ``wanted`` is an empty placeholder."""
    want_x, want_wg, want_bg, want_wu, want_bu, want_wd, want_bd = wanted
    x_rows = x.reshape(-1, x.shape[-1])
    dout_rows = dout.reshape(-1, dout.shape[-1])
    gate = torch.nn.functional.linear(x_rows, w_gate, b_gate)  # recomputed: fresh and packed
    up = torch.nn.functional.linear(x_rows, w_up, b_up)
    d_act = torch.mm(dout_rows, w_down)
    dgate, dup = _swiglu_backward(d_act, gate, up, recompute=want_wd, in_place=True)
    del gate, up  # in eager they are dgate and dup now
    grads = [x.new_empty(0) for _ in range(7)]  # distinct: an operator's outputs may not alias each other
    if want_wd:
        grads[5] = torch.mm(dout_rows.t(), d_act)
    if want_bd:
        grads[6] = dout_rows.sum(0)
    del d_act
    if want_x:  # the sum autograd forms from the two projections' input gradients
        grads[0] = torch.mm(dgate, w_gate).add_(torch.mm(dup, w_up)).view(x.shape)
    for slot, want, grad in ((1, want_wg, dgate), (3, want_wu, dup)):
        if want:
            grads[slot] = torch.mm(grad.t(), x_rows)
    for slot, want, grad in ((2, want_bg, dgate), (4, want_bu, dup)):
        if want:
            grads[slot] = grad.sum(0)
    return grads


def _mlp_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, w_gate, b_gate, w_up, b_up, w_down, b_down = inputs
    ctx.save_for_backward(x, w_gate, b_gate, w_up, b_up, w_down)
    ctx.has_bias = [b is not None for b in (b_gate, b_up, b_down)]


def _mlp_backward_formula(ctx, dout):  # noqa: ANN001, ANN202
    x, w_gate, b_gate, w_up, b_up, w_down = ctx.saved_tensors
    has_bg, has_bu, has_bd = ctx.has_bias
    needs = ctx.needs_input_grad
    wanted = [needs[0], needs[1], has_bg and needs[2], needs[3], has_bu and needs[4], needs[5], has_bd and needs[6]]
    grads = SWIGLU_MLP_BACKWARD(dout, x, w_gate, b_gate, w_up, b_up, w_down, wanted)
    return tuple(g if want else None for g, want in zip(grads, wanted, strict=True))


SWIGLU_MLP_BACKWARD = KernelOp("swiglu_mlp_backward", _mlp_backward)
SWIGLU_MLP = KernelOp("swiglu_mlp", _mlp_forward, setup_context=_mlp_setup_context, backward=_mlp_backward_formula)


def check_swiglu_args(gate: torch.Tensor, up: torch.Tensor) -> None:
    """One-line ``ValueError`` unless gate and up have one shape and one floating dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype or not gate.dtype.is_floating_point:
        raise ValueError(f"swiglu: gate ({gate.dtype}) and up ({up.dtype}) must share one floating dtype")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with autograd, any strides; gate and up must have the same shape and dtype."""
    check_swiglu_args(gate, up)
    return SWIGLU(gate, up)


def swiglu_linear(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(silu(gate) * up, weight, bias)`` with autograd that saves gate and up, not the activation."""
    check_swiglu_args(gate, up)
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1] or weight.dtype != gate.dtype:
        raise ValueError(
            f"swiglu_linear: weight {tuple(weight.shape)} {weight.dtype} does not take "
            f"{gate.shape[-1]}-wide {gate.dtype} activations"
        )
    return SWIGLU_LINEAR(gate, up, weight, bias)


def swiglu_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(silu(x W_gate^T + b_gate) * (x W_up^T + b_up), W_down, b_down)`` with autograd that saves only
    ``x`` and the weights: backward recomputes both projections."""
    hidden, inter = x.shape[-1], w_gate.shape[0]
    for name, w, shape in (("w_gate", w_gate, (inter, hidden)), ("w_up", w_up, (inter, hidden)),
                           ("w_down", w_down, (w_down.shape[0], inter))):  # fmt: skip
        if w.dim() != 2 or tuple(w.shape) != shape or w.dtype != x.dtype:
            raise ValueError(
                f"swiglu_mlp: {name} {tuple(w.shape)} {w.dtype} does not fit {hidden}-wide {x.dtype} inputs "
                f"and a {inter}-wide intermediate"
            )
    if not x.dtype.is_floating_point:
        raise ValueError(f"swiglu_mlp: x must be floating point, not {x.dtype}")
    return SWIGLU_MLP(x, w_gate, b_gate, w_up, b_up, w_down, b_down)
