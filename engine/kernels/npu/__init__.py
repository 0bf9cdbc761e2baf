"""Ascend NPU kernels (torch_npu, imported lazily). Importing this package registers every kernel module in it."""

from __future__ import annotations

import importlib
import pkgutil

from engine.kernels.npu.fused_moe import NpuFusedMoEKernel, NpuMoEFusedMoEKernel
from engine.kernels.npu.rms_norm import NpuRMSNormKernel
from engine.kernels.npu.rope import NpuRoPEKernel
from engine.kernels.npu.swiglu import NpuSwiGLUKernel, NpuSwiGluKernel
from engine.kernels.npu.vision_rope import NpuQwen2VLRoPEKernel

# Any other kernel module in the package registers its classes on import too.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "NpuFusedMoEKernel",
    "NpuMoEFusedMoEKernel",
    "NpuQwen2VLRoPEKernel",
    "NpuRMSNormKernel",
    "NpuRoPEKernel",
    "NpuSwiGLUKernel",
    "NpuSwiGluKernel",
]
