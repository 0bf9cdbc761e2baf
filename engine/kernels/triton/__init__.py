"""CUDA kernels written in Triton. Importing this package registers the kernel classes; triton itself is
imported only when a kernel first runs, so a machine without triton still plans (and reports the skip)."""

from engine.kernels.triton.classes import (
    TritonFusedMoEKernel,
    TritonMRoPEKernel,
    TritonRMSNormKernel,
    TritonRoPEKernel,
    TritonSwiGluKernel,
    TritonVisionRoPEKernel,
)

__all__ = [
    "TritonFusedMoEKernel",
    "TritonMRoPEKernel",
    "TritonRMSNormKernel",
    "TritonRoPEKernel",
    "TritonSwiGluKernel",
    "TritonVisionRoPEKernel",
]
