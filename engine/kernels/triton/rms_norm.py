"""RMSNorm on CUDA through the Triton kernel in ``ops/rms_norm.py``."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.rms_norm import RMSNormOptions, epsilon
from engine.kernels.triton.base import TritonKernel

MAX_COLUMNS = 65536  # one row per program block; wider rows keep the original


class TritonRMSNormKernel(TritonKernel):
    type = KernelType.RMSNORM
    device = "cuda"
    under_compile = "original"  # Inductor generates this kernel too and fuses it with its neighbours

    @classmethod
    def supports(cls, options: RMSNormOptions, x: torch.Tensor) -> bool:
        return 0 < x.shape[-1] <= MAX_COLUMNS and x.dtype.is_floating_point

    @classmethod
    def run(cls, module: nn.Module, options: RMSNormOptions, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.triton.ops.rms_norm import rms_norm

        return rms_norm(x, module.weight, epsilon(module), options.weight_offset, options.casting == "gemma")
