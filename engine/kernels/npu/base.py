"""Shared plumbing of the Ascend kernels: the lazy ``torch_npu`` import and which tensors take the NPU path."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from engine.device import torch_npu_installed
from engine.kernels.base import MetaKernel

INSTALL_HINT = "torch_npu is not installed (pip install 'engine[npu]' on an Ascend machine)"


def torch_npu() -> ModuleType:
    """The imported ``torch_npu`` module (real, or a stand-in registered in ``sys.modules`` by tests)."""
    return sys.modules.get("torch_npu") or importlib.import_module("torch_npu")


def standin_active() -> bool:
    """The CPU stand-in used by the test-suite marks itself; the real torch_npu never does."""
    return bool(getattr(sys.modules.get("torch_npu"), "__engine_standin__", False))


class NpuKernel(MetaKernel):
    """Base of the NPU kernels (declares no type/device itself, so it does not register)."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch_npu_installed():
            return INSTALL_HINT
        try:
            torch_npu()
        except Exception as exc:  # a broken install must not crash patching
            return f"torch_npu failed to import: {exc}"
        return None

    @classmethod
    def tensor_devices(cls) -> frozenset[str]:
        return frozenset({"npu", "cpu"}) if standin_active() else frozenset({"npu"})
