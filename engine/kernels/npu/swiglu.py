"""SwiGLU MLP on Ascend through ``torch_npu.npu_swiglu``."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.npu.base import NpuKernel, torch_npu


class NpuSwiGluKernel(NpuKernel):
    type = "swiglu"
    device = "npu"

    @classmethod
    def module_forward(cls, module: nn.Module, options: BaseModel, x: torch.Tensor) -> torch.Tensor:
        gate_up = torch.cat((module.gate_proj(x), module.up_proj(x)), dim=-1)
        return module.down_proj(torch_npu().npu_swiglu(gate_up, dim=-1))
