"""Shared plumbing of the Ascend kernels: the lazy ``torch_npu`` import, version and op checks, dtype tables.

Every NPU kernel class declares what it needs from torch_npu as class attributes:

- ``min_torch_npu``: a :class:`~engine.kernels.npu.versions.Requirement` (the first release that has the ops
  with the arguments the kernel passes, and the behaviour it relies on);
- ``ops``: the torch_npu functions it calls (checked with ``hasattr``: alpha builds reuse release versions);
- ``op_dtypes``: per op, the dtype combinations of its inputs that its documentation accepts (Atlas A2/A3
  training products), as tuples in the order the kernel checks them (e.g. ``(x, gamma)``).

Below the version, or with an op missing, :meth:`NpuKernel.unavailable_reason` says why and the planner
reports the entry as skipped; per call, ``supports`` declines dtypes an op does not accept.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import ClassVar

import torch

from engine.device import torch_npu_installed
from engine.kernels.base import MetaKernel
from engine.kernels.npu.versions import Requirement

INSTALL_HINT = "torch_npu is not installed (pip install 'engine[npu]' on an Ascend machine)"

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
DtypeCombos = frozenset[tuple[torch.dtype, ...]]


def each_float(arity: int = 1) -> DtypeCombos:
    """Every combination of the three float dtypes where all ``arity`` inputs share one dtype."""
    return frozenset((dtype,) * arity for dtype in FLOATS)


def torch_npu() -> ModuleType:
    """The imported ``torch_npu`` module (real, or a stand-in registered in ``sys.modules`` by tests)."""
    return sys.modules.get("torch_npu") or importlib.import_module("torch_npu")


def standin_active() -> bool:
    """The CPU stand-in used by the test-suite marks itself; the real torch_npu never does."""
    return bool(getattr(sys.modules.get("torch_npu"), "__engine_standin__", False))


class NeedsTorchNpu:
    """Mixin of the portable kernels' NPU classes: no op of their own, but an NPU model runs nothing without
    torch_npu, so they are skipped with the same reason as the NPU kernels."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if torch_npu_installed() else INSTALL_HINT


class NpuKernel(MetaKernel):
    """Base of the NPU kernels (declares no type/device itself, so it does not register)."""

    min_torch_npu: ClassVar[Requirement]
    ops: ClassVar[tuple[str, ...]] = ()
    op_dtypes: ClassVar[Mapping[str, DtypeCombos]] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch_npu_installed():
            return INSTALL_HINT
        try:
            npu = torch_npu()
        except Exception as exc:  # a broken install must not crash patching
            return f"torch_npu failed to import: {exc}"
        too_old = cls.min_torch_npu.problem(getattr(npu, "__version__", None))
        if too_old:
            return too_old
        missing = [op for op in cls.ops if not hasattr(npu, op)]
        if missing:
            return f"torch_npu {npu.__version__} has no {', '.join(missing)}"
        return None

    @classmethod
    def tensor_devices(cls) -> frozenset[str]:
        return frozenset({"npu", "cpu"}) if standin_active() else frozenset({"npu"})

    @classmethod
    def accepts(cls, op: str, *tensors: torch.Tensor) -> bool:
        """Whether ``op``'s documented dtype combinations include that of ``tensors``."""
        return tuple(t.dtype for t in tensors) in cls.op_dtypes[op]
