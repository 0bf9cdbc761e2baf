"""RMSNorm on Ascend through ``torch_npu.npu_rms_norm``."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.rms_norm import RMSNormOptions, epsilon
from engine.kernels.npu.base import NpuKernel, torch_npu


class NpuRMSNormKernel(NpuKernel):
    type = KernelType.RMSNORM
    device = "npu"

    @classmethod
    def supports(cls, options: RMSNormOptions, x: torch.Tensor) -> bool:
        return options.casting == "llama"

    @classmethod
    def run(cls, module: nn.Module, options: RMSNormOptions, x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if weight.dtype != x.dtype:  # transformers promotes the output dtype; keep its exact behaviour
            return type(module).forward(module, x)
        gamma = weight + options.weight_offset if options.weight_offset else weight
        return torch_npu().npu_rms_norm(x, gamma, epsilon=epsilon(module))[0]
