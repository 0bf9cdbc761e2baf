"""RMSNorm on Ascend through ``torch_npu.npu_rms_norm``."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.kernel_types import rms_norm_eps
from engine.kernels.npu.base import NpuKernel, torch_npu
from engine.kernels.options import RMSNormOptions


class NpuRMSNormKernel(NpuKernel):
    type = "rms_norm"
    device = "npu"

    @classmethod
    def module_forward(cls, module: nn.Module, options: RMSNormOptions, x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if weight.dtype != x.dtype:  # transformers would promote the output dtype; keep its exact behaviour
            return type(module).forward(module, x)
        gamma = weight + options.weight_offset if options.weight_offset else weight
        return torch_npu().npu_rms_norm(x, gamma, epsilon=rms_norm_eps(module))[0]
