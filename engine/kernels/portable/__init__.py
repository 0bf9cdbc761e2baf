"""Portable kernels: plain PyTorch that runs on any device (CPU, XPU, MPS), for kinds whose gain is memory, not
a device-specific instruction. Importing this package registers every kernel class module in it."""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "ops":
        importlib.import_module(f"{__name__}.{_info.name}")

from engine.kernels.portable.linear_cross_entropy import (  # noqa: E402
    CpuLinearCrossEntropyKernel,
    MpsLinearCrossEntropyKernel,
    XpuLinearCrossEntropyKernel,
)

__all__ = ["CpuLinearCrossEntropyKernel", "MpsLinearCrossEntropyKernel", "XpuLinearCrossEntropyKernel"]
