"""SwiGLU MLP on CUDA: the projections stay cuBLAS GEMMs, ``silu(gate) * up`` is one Triton pass each way."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.triton.base import TritonKernel


class TritonSwiGLUKernel(TritonKernel):
    type = KernelType.SWIGLU
    device = "cuda"
    under_compile = "original"  # Inductor generates this kernel too and fuses it with its neighbours

    @classmethod
    def run(cls, module: nn.Module, options: BaseModel, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.triton.ops.swiglu import swiglu

        gate, up = module.gate_proj(x), module.up_proj(x)
        if gate.shape != up.shape or gate.dtype != up.dtype:
            return module.down_proj(module.act_fn(gate) * up)
        return module.down_proj(swiglu(gate, up))


TritonSwiGluKernel = TritonSwiGLUKernel  # the name earlier engine releases used
