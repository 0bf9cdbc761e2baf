"""Declarative kernel patch specs for Hugging Face transformers models.

import engine
handle = engine.apply(model, spec="qwen3_moe")     # explicit spec, manual entries included
engine.apply_available_kernels(model)              # every automatic kernel for this model and device
print(engine.kernel_report(model)); engine.revert(model)
"""

from engine import kernels as _kernels  # noqa: F401  (registers the built-in kernels)
from engine.api import (
    apply,
    apply_available_kernels,
    apply_kernel,
    discover_kernels,
    handles,
    kernel_report,
    plan,
    revert,
)
from engine.catalog import find_spec, load_catalog
from engine.device import DeviceType, detect_device
from engine.errors import (
    DeviceMismatchError,
    EngineError,
    KernelUnavailableError,
    NoSpecError,
    PatchConflictError,
    SpecError,
    UnknownKernelError,
)
from engine.kernels.base import Kernel, MetaKernel
from engine.kernels.kinds import KernelType
from engine.kernels.npu import (
    NpuFusedMoEKernel,
    NpuMoEFusedMoEKernel,
    NpuQwen2VLRoPEKernel,
    NpuRMSNormKernel,
    NpuRoPEKernel,
    NpuSwiGLUKernel,
    NpuSwiGluKernel,
)
from engine.kernels.registry import REGISTRY
from engine.kernels.triton import (
    TritonEmbeddingKernel,
    TritonFusedMoEKernel,
    TritonMRoPEKernel,
    TritonRMSNormKernel,
    TritonRoPEKernel,
    TritonSwiGLUKernel,
    TritonVisionRoPEKernel,
)
from engine.log import set_verbosity
from engine.patching import PatchHandle
from engine.report import PatchReport
from engine.spec import KernelSpec, SpecEntry, load_spec_file
from engine.training import apply_training_config

__all__ = [
    "REGISTRY",
    "DeviceMismatchError",
    "DeviceType",
    "EngineError",
    "Kernel",
    "KernelSpec",
    "KernelType",
    "KernelUnavailableError",
    "MetaKernel",
    "NoSpecError",
    "NpuFusedMoEKernel",
    "NpuMoEFusedMoEKernel",
    "NpuQwen2VLRoPEKernel",
    "NpuRMSNormKernel",
    "NpuRoPEKernel",
    "NpuSwiGLUKernel",
    "NpuSwiGluKernel",
    "PatchConflictError",
    "PatchHandle",
    "PatchReport",
    "SpecEntry",
    "SpecError",
    "TritonEmbeddingKernel",
    "TritonFusedMoEKernel",
    "TritonMRoPEKernel",
    "TritonRMSNormKernel",
    "TritonRoPEKernel",
    "TritonSwiGLUKernel",
    "TritonVisionRoPEKernel",
    "UnknownKernelError",
    "apply",
    "apply_available_kernels",
    "apply_kernel",
    "apply_training_config",
    "detect_device",
    "discover_kernels",
    "find_spec",
    "handles",
    "kernel_report",
    "load_catalog",
    "load_spec_file",
    "plan",
    "revert",
    "set_verbosity",
]
