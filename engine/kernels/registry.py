"""Which kernel class serves a kernel kind on a device.

Classes with ``auto_register = True`` (the default) are *registered*: they serve every spec entry of their
kind on their device, and ``discover_kernels()`` lists them. Classes with ``auto_register = False`` are only
*known*: they are used where an explicit spec or ``apply_kernel`` asks for them (see ``engine.planner``'s
``is_automatic`` for the one rule that decides what is applied automatically).
"""

from __future__ import annotations

from typing import Any

from engine import log

KernelClass = Any  # a MetaKernel subclass (typed loosely: base.py imports this module)


class KernelRegistry:
    def __init__(self) -> None:
        self._registered: dict[tuple[str, str], KernelClass] = {}
        self._manual: dict[tuple[str, str], KernelClass] = {}

    def add(self, kernel: KernelClass) -> None:
        table = self._registered if kernel.auto_register else self._manual
        key = (kernel.kind, str(kernel.device))
        previous = table.get(key)
        if previous is not None and previous is not kernel:
            log.warn(f"kernel {kernel.__name__} replaces {previous.__name__} for {key[0]} on {key[1]}")
        table[key] = kernel

    def remove(self, kernel: KernelClass) -> None:
        for table in (self._registered, self._manual):
            key = (kernel.kind, str(kernel.device))
            if table.get(key) is kernel:
                del table[key]

    def get(self, kind: str, device: str) -> KernelClass | None:
        """The class serving ``kind`` on ``device``: the registered one, else a manual one."""
        key = (kind, str(device))
        return self._registered.get(key) or self._manual.get(key)

    def devices_for(self, kind: str) -> list[str]:
        return sorted({d for k, d in (*self._registered, *self._manual) if k == kind})

    def registered(self, device: str | None = None) -> list[KernelClass]:
        """Registered (automatic) classes, optionally of one device."""
        found = [k for k in self._registered.values() if device is None or str(k.device) == str(device)]
        return sorted(found, key=lambda k: (str(k.device), k.kind))

    def all(self) -> list[KernelClass]:
        """Every known class, registered or manual."""
        return sorted({*self._registered.values(), *self._manual.values()}, key=lambda k: (str(k.device), k.kind))

    def names(self) -> list[str]:
        return [k.__name__ for k in self.all()]


REGISTRY = KernelRegistry()
