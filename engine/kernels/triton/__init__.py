"""CUDA kernels written in Triton. Importing this package registers every kernel class module in it; triton
itself is imported only when a kernel first runs (``ops``), so a machine without triton still plans and
reports the skip."""

from __future__ import annotations

import importlib
import pkgutil

from engine.kernels.triton.embedding import TritonEmbeddingKernel
from engine.kernels.triton.fused_moe import TritonFusedMoEKernel
from engine.kernels.triton.mrope import TritonMRoPEKernel
from engine.kernels.triton.rms_norm import TritonRMSNormKernel
from engine.kernels.triton.rope import TritonRoPEKernel
from engine.kernels.triton.swiglu import TritonSwiGLUKernel
from engine.kernels.triton.vision_rope import TritonVisionRoPEKernel

# Any other kernel module in the package registers its classes on import too.
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "launch", "runtime", "moe_tiles", "ops"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "TritonEmbeddingKernel",
    "TritonFusedMoEKernel",
    "TritonMRoPEKernel",
    "TritonRMSNormKernel",
    "TritonRoPEKernel",
    "TritonSwiGLUKernel",
    "TritonVisionRoPEKernel",
]
