"""Portable kernels: plain PyTorch that runs on any device (CPU, XPU, MPS), for kinds whose gain is memory, not
a device-specific instruction. Importing this package registers every kernel class module in it."""

from __future__ import annotations

import importlib
import pkgutil

from engine.kernels.portable.linear_cross_entropy import (
    CpuLinearCrossEntropyKernel,
    MpsLinearCrossEntropyKernel,
    XpuLinearCrossEntropyKernel,
)

# Any other kernel module in the package registers its classes on import too.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "ops":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["CpuLinearCrossEntropyKernel", "MpsLinearCrossEntropyKernel", "XpuLinearCrossEntropyKernel"]
