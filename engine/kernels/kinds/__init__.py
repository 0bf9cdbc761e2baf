"""Kernel kinds: one module each, found by scanning this package (adding a kind adds a file, nothing else)."""

from __future__ import annotations

import importlib
import pkgutil

from engine.errors import UnknownKernelError
from engine.kernels.kinds.base import KernelKind, KernelType


def _discover() -> dict[str, KernelKind]:
    kinds: dict[str, KernelKind] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        kind = getattr(importlib.import_module(f"{__name__}.{info.name}"), "KIND", None)
        if isinstance(kind, KernelKind):
            kinds[kind.name] = kind
    return dict(sorted(kinds.items()))


KINDS: dict[str, KernelKind] = _discover()
# Each KernelType's own kind: what a kernel class declaring only `type` serves.
DEFAULT_KIND: dict[KernelType, str] = {
    KernelType.RMSNORM: "rms_norm",
    KernelType.SWIGLU: "swiglu",
    KernelType.ROPE: "rope",
    KernelType.MOE: "fused_moe",
    KernelType.LINEAR_CROSS_ENTROPY: "linear_cross_entropy",
    KernelType.ATTENTION: "sdpa_is_causal",
    KernelType.EMBEDDING: "embedding",
}


def get_kind(name: str) -> KernelKind:
    """Look a kind up by its spec name, raising a clear error that lists the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKernelError(f"unknown kernel {name!r}; known kernels: {', '.join(KINDS)}") from None


__all__ = ["DEFAULT_KIND", "KINDS", "KernelKind", "KernelType", "get_kind"]
