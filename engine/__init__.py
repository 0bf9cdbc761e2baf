"""Declarative kernel patch specs for Hugging Face transformers models.

import engine
handle = engine.apply(model, spec="qwen3_moe")     # explicit spec, manual entries included
engine.apply_available_kernels(model)              # every automatic kernel for this model and device
print(engine.kernel_report(model)); engine.revert(model)
"""

from engine import kernels as _kernels  # noqa: F401  (registers built-in kernels)
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
from engine.device import detect_device
from engine.errors import (
    EngineError,
    KernelUnavailableError,
    PatchConflictError,
    SpecError,
    UnknownKernelError,
)
from engine.kernels.base import Kernel
from engine.kernels.npu import (
    NpuMoEFusedMoEKernel,
    NpuQwen2VLRoPEKernel,
    NpuRMSNormKernel,
    NpuRoPEKernel,
    NpuSwiGluKernel,
)
from engine.kernels.triton import (
    TritonFusedMoEKernel,
    TritonMRoPEKernel,
    TritonRMSNormKernel,
    TritonRoPEKernel,
    TritonSwiGluKernel,
    TritonVisionRoPEKernel,
)
from engine.logging_setup import configure_default_logger
from engine.patch import PatchHandle
from engine.registry import REGISTRY, MetaKernel
from engine.report import PatchReport
from engine.spec import KernelSpec, SpecEntry, load_spec_file
from engine.training import apply_training_config

configure_default_logger()

__all__ = [
    "REGISTRY",
    "EngineError",
    "Kernel",
    "KernelSpec",
    "KernelUnavailableError",
    "MetaKernel",
    "NpuMoEFusedMoEKernel",
    "NpuQwen2VLRoPEKernel",
    "NpuRMSNormKernel",
    "NpuRoPEKernel",
    "NpuSwiGluKernel",
    "PatchConflictError",
    "PatchHandle",
    "PatchReport",
    "SpecEntry",
    "SpecError",
    "TritonFusedMoEKernel",
    "TritonMRoPEKernel",
    "TritonRMSNormKernel",
    "TritonRoPEKernel",
    "TritonSwiGluKernel",
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
]
