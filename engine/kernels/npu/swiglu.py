"""SwiGLU MLP on Ascend through ``torch_npu.npu_swiglu``."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import NpuKernel, torch_npu


class NpuSwiGLUKernel(NpuKernel):
    type = KernelType.SWIGLU
    device = "npu"

    @classmethod
    def run(cls, module: nn.Module, options: BaseModel, x: torch.Tensor) -> torch.Tensor:
        gate_up = torch.cat((module.gate_proj(x), module.up_proj(x)), dim=-1)
        return module.down_proj(torch_npu().npu_swiglu(gate_up, dim=-1))


NpuSwiGluKernel = NpuSwiGLUKernel  # the seed's name
