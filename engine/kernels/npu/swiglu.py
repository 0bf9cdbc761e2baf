"""SwiGLU MLP on Ascend through ``torch_npu.npu_swiglu`` (which activates the *first* half: the gate).

``recompute: projections`` checkpoints the whole MLP (its down projection runs again in backward too): the
memory saving of the CUDA kernel's ``engine::swiglu_mlp`` for one more GEMM.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.swiglu import SwiGLUOptions, recomputed
from engine.kernels.npu.base import NpuKernel, each_float, torch_npu
from engine.kernels.npu.versions import Requirement


class NpuSwiGLUKernel(NpuKernel):
    type = KernelType.SWIGLU
    device = "npu"
    min_torch_npu = Requirement("6.0.rc1")
    ops = ("npu_swiglu",)
    op_dtypes = {"npu_swiglu": each_float()}

    @classmethod
    def supports(cls, options: BaseModel, x: torch.Tensor) -> bool:
        return x.numel() > 0 and cls.accepts("npu_swiglu", x)  # the projections keep x's dtype

    @classmethod
    def run(cls, module: nn.Module, options: SwiGLUOptions, x: torch.Tensor) -> torch.Tensor:
        if options.recompute == "projections":
            return recomputed(lambda h: cls._mlp(module, h), x)
        return cls._mlp(module, x)

    @staticmethod
    def _mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate_up = torch.cat((module.gate_proj(x), module.up_proj(x)), dim=-1)  # contiguous, as the op needs
        return module.down_proj(torch_npu().npu_swiglu(gate_up, dim=-1))


NpuSwiGluKernel = NpuSwiGLUKernel  # the seed's name
