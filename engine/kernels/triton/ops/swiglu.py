"""Triton SwiGLU activation ``silu(gate) * up`` as ``engine::swiglu``: one pass each way, fp32 math.

The kernels stream packed elements; gate or up tensors that are not packed (a chunk of a fused gate_up
projection, a transposed view) are copied to packed ones first. Outputs and gradients are packed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.ops.library import KernelOp, run_kernel
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
def _swiglu_bwd(A, B, DC, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    da, db = silu_mul_backward(a, b, dc)
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, db.to(DB.dtype.element_ty), mask=mask)


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        run_kernel(_swiglu_fwd, (cdiv(n, BLOCK),), gate, up, out, n, BLOCK=BLOCK, num_warps=8)
    return out


def _backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, dout = gate.contiguous(), up.contiguous(), dout.contiguous()
    dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
    dup = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        run_kernel(_swiglu_bwd, (cdiv(n, BLOCK),), gate, up, dout, dgate, dup, n, BLOCK=BLOCK, num_warps=8)
    return dgate, dup


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _backward_formula(ctx, dout):  # noqa: ANN001, ANN202
    gate, up = ctx.saved_tensors
    return SWIGLU_BACKWARD(dout, gate, up)


SWIGLU_BACKWARD = KernelOp("swiglu_backward", _backward)
SWIGLU = KernelOp("swiglu", _forward, setup_context=_setup_context, backward=_backward_formula)


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
