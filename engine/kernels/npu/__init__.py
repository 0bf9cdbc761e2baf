"""Ascend NPU kernels (torch_npu). Importing this package registers them; torch_npu is imported lazily."""

from engine.kernels.npu.moe import NpuMoEFusedMoEKernel
from engine.kernels.npu.rms_norm import NpuRMSNormKernel
from engine.kernels.npu.rope import NpuQwen2VLRoPEKernel, NpuRoPEKernel
from engine.kernels.npu.swiglu import NpuSwiGluKernel

__all__ = [
    "NpuMoEFusedMoEKernel",
    "NpuQwen2VLRoPEKernel",
    "NpuRMSNormKernel",
    "NpuRoPEKernel",
    "NpuSwiGluKernel",
]
