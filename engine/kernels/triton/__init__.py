"""CUDA kernels written in Triton. Importing this package registers every kernel class module in it; triton
itself is imported only when a kernel first runs (``ops``), so a machine without triton still plans and
reports the skip."""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "launch", "runtime", "moe_tiles", "ops"):
        importlib.import_module(f"{__name__}.{_info.name}")

from engine.kernels.triton.fused_moe import TritonFusedMoEKernel  # noqa: E402
from engine.kernels.triton.mrope import TritonMRoPEKernel  # noqa: E402
from engine.kernels.triton.rms_norm import TritonRMSNormKernel  # noqa: E402
from engine.kernels.triton.rope import TritonRoPEKernel  # noqa: E402
from engine.kernels.triton.swiglu import TritonSwiGLUKernel  # noqa: E402
from engine.kernels.triton.vision_rope import TritonVisionRoPEKernel  # noqa: E402

__all__ = [
    "TritonFusedMoEKernel",
    "TritonMRoPEKernel",
    "TritonRMSNormKernel",
    "TritonRoPEKernel",
    "TritonSwiGLUKernel",
    "TritonVisionRoPEKernel",
]
