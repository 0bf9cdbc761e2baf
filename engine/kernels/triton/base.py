"""Shared plumbing of the CUDA kernels: triton availability and which tensors take the Triton path."""

from __future__ import annotations

from engine.kernels.base import MetaKernel
from engine.kernels.triton import runtime


class TritonKernel(MetaKernel):
    """Base of the Triton kernels (no type/device, so it does not register)."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return runtime.unavailable_reason()

    @classmethod
    def tensor_devices(cls) -> frozenset[str]:
        return frozenset({"cuda", "cpu"}) if runtime.interpreting() else frozenset({"cuda"})
