"""Triton SwiGLU activation ``silu(gate) * up``: one pass forward, one pass backward, fp32 math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.launch import launch

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


def _forward(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed gate, packed up, silu(gate) * up)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    launch(_swiglu_fwd, (triton.cdiv(n, BLOCK),), gate, up, out, n, BLOCK=BLOCK, num_warps=8)
    return gate, up, out


class TritonSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate_c, up_c, out = _forward(gate, up)
        ctx.save_for_backward(gate_c, up_c)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        launch(_swiglu_bwd, (triton.cdiv(n, BLOCK),), gate, up, dout, dgate, dup, n, BLOCK=BLOCK, num_warps=8)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with autograd; gate and up must have the same shape and dtype."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return TritonSwiGLUFunction.apply(gate, up)
    return _forward(gate, up)[2]
