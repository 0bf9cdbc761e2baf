"""Base class of every kernel. A kernel is a class: it is registered, asked, and called, never instantiated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kernel_types import KernelType, get_kernel_type
from engine.registry import MetaKernel


class Kernel(metaclass=MetaKernel):
    """Subclasses declare ``type`` (a kernel type name) and ``device``; they register on definition.

    Module kernels implement :meth:`module_forward`; function kernels implement :meth:`function`.
    A patched call whose tensors are not on the kernel's device runs the original code instead.
    """

    type: ClassVar[str]
    device: ClassVar[str]
    auto_register: ClassVar[bool] = True
    requires: ClassVar[str] = ""

    @classmethod
    def kernel_type(cls) -> KernelType:
        return get_kernel_type(cls.type)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` when the kernel's runtime (torch_npu, triton) is importable here, else why not."""
        return None

    @classmethod
    def incompatibility(cls, target: Any, options: BaseModel) -> str | None:
        """Device-specific limits on a target beyond the kernel type's shared check."""
        return None

    @classmethod
    def runs_on(cls, tensor: torch.Tensor) -> bool:
        """Whether a call with this tensor should take the kernel path."""
        return tensor.device.type == cls.device

    @classmethod
    def module_forward(cls, module: nn.Module, options: BaseModel, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{cls.__name__} does not patch modules")

    @classmethod
    def function(cls, original: Callable[..., Any], options: BaseModel, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{cls.__name__} does not patch functions")

    @classmethod
    def describe(cls) -> str:
        manual = "" if cls.auto_register else " (manual: spec/apply_kernel only)"
        return f"{cls.__name__}: {cls.type} on {cls.device}{manual}"


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The first tensor among call arguments (used to pick kernel vs original path)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None
