"""Kernel registry: every class declaring ``type`` and ``device`` registers itself through ``MetaKernel``.

``auto_register = False`` keeps a kernel out of automatic discovery (``apply_available_kernels``,
``discover_kernels``); it stays reachable by name, by an explicit spec (``engine.apply(model, spec=...)``)
and by ``apply_kernel``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.device import validate_device
from engine.kernels.kernel_types import get_kernel_type

if TYPE_CHECKING:
    from engine.kernels.base import Kernel

logger = logging.getLogger("engine")


class KernelRegistry:
    """Kernel classes keyed by ``(type, device)``."""

    def __init__(self) -> None:
        self._kernels: dict[tuple[str, str], type[Kernel]] = {}

    def register(self, kernel: type[Kernel]) -> None:
        get_kernel_type(kernel.type)  # raises UnknownKernelError for a type the engine does not know
        key = (kernel.type, validate_device(kernel.device))
        previous = self._kernels.get(key)
        if previous is not None and previous is not kernel:
            logger.warning("kernel %s replaces %s for %s on %s", kernel.__name__, previous.__name__, *key)
        self._kernels[key] = kernel

    def unregister(self, kernel: type[Kernel]) -> None:
        key = (kernel.type, kernel.device)
        if self._kernels.get(key) is kernel:
            del self._kernels[key]

    def get(self, kernel_type: str, device: str) -> type[Kernel] | None:
        return self._kernels.get((kernel_type, device))

    def by_name(self, name: str) -> type[Kernel]:
        for kernel in self._kernels.values():
            if kernel.__name__ == name:
                return kernel
        raise KeyError(f"no kernel class named {name!r}; registered: {', '.join(sorted(self.names()))}")

    def names(self) -> list[str]:
        return [k.__name__ for k in self._kernels.values()]

    def all(self) -> list[type[Kernel]]:
        return sorted(self._kernels.values(), key=lambda k: (k.device, k.type))

    def for_device(self, device: str, include_manual: bool = False) -> list[type[Kernel]]:
        return [k for k in self.all() if k.device == device and (include_manual or k.auto_register)]


REGISTRY = KernelRegistry()


class MetaKernel(type):
    """Registers each class that declares both ``type`` and ``device`` in its own body."""

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict) -> None:
        super().__init__(name, bases, namespace)
        if "type" in namespace and "device" in namespace:
            REGISTRY.register(cls)  # type: ignore[arg-type]
