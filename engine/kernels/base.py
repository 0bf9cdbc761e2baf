"""``MetaKernel``: the base class every kernel inherits. Declaring ``type`` and ``device`` registers a class.

A kernel is a class: registered, asked, and called, never instantiated. ``type`` is a seed
:class:`KernelType` (``KernelType.RMSNORM``) or a spec kernel kind (``"vision_rope"``); ``kind`` may name the
kind explicitly where a type has several (``ROPE``: ``rope``, ``vision_rope``, ``mrope``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel

from engine.device import DeviceType, validate_device
from engine.errors import UnknownKernelError
from engine.kernels.kinds import DEFAULT_KIND, KINDS, KernelType
from engine.kernels.registry import REGISTRY


def _normalise(cls: type, namespace: dict[str, Any]) -> None:
    """Fill ``type``/``kind`` from whichever the class declared, and check that they agree."""
    declared = str(getattr(namespace["type"], "value", namespace["type"]))
    kind = namespace.get("kind")
    if kind is None:
        seed_types = {t.value: t for t in KernelType}
        kind = declared if declared in KINDS else DEFAULT_KIND.get(seed_types.get(declared))  # type: ignore[arg-type]
    if kind not in KINDS:
        known = ", ".join([t.value for t in KernelType] + list(KINDS))
        raise UnknownKernelError(f"{cls.__name__}: unknown kernel type {declared!r}; known: {known}")
    spec_kind = KINDS[kind]
    if declared not in (kind, spec_kind.type.value):
        raise UnknownKernelError(f"{cls.__name__}: kind {kind!r} is a {spec_kind.type} kernel, not {declared!r}")
    cls.type = spec_kind.type  # type: ignore[attr-defined]
    cls.kind = kind  # type: ignore[attr-defined]
    cls.device = validate_device(namespace["device"], source=f"{cls.__name__}.device")  # type: ignore[attr-defined]


class KernelMeta(type):
    """Registers each class that declares both ``type`` and ``device`` in its own body."""

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> None:
        super().__init__(name, bases, namespace)
        if "type" in namespace and "device" in namespace:
            _normalise(cls, namespace)
            REGISTRY.add(cls)


class MetaKernel(metaclass=KernelMeta):
    """Subclass it, declare ``type`` and ``device``, implement :meth:`run`; the class registers itself.

    ``auto_register = False`` keeps the class out of automatic use (``apply_available_kernels``,
    ``discover_kernels()``): it is applied where an explicit spec or ``apply_kernel`` asks for it.
    """

    type: ClassVar[KernelType]
    device: ClassVar[DeviceType]
    kind: ClassVar[str]
    auto_register: ClassVar[bool] = True
    # Inside torch.compile: "kernel" traces this kernel's operator; "original" lets the compiler see the original
    # code, for kernels whose work the compiler generates as well and can fuse with its neighbours
    # (``ENGINE_UNDER_COMPILE=kernel`` keeps every kernel).
    under_compile: ClassVar[Literal["kernel", "original"]] = "kernel"

    @classmethod
    def apply(cls, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        """``apply_kernel(model, cls)``."""
        from engine.api import apply_kernel  # at call time: api builds on this class, not the other way round

        return apply_kernel(model, cls, **kwargs)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` when the kernel's runtime (torch_npu, triton) can run here, else why not."""
        return None

    @classmethod
    def tensor_devices(cls) -> frozenset[str]:
        """Device types of tensors that take the kernel path (decided when the patch is installed)."""
        return frozenset({str(cls.device)})

    @classmethod
    def incompatibility(cls, target: Any, options: BaseModel) -> str | None:
        """Plan-time limits of this device's kernel on a target, beyond the kind's shared check."""
        return None

    @classmethod
    def plan_note(cls, target: Any, options: BaseModel) -> str | None:
        """A choice this kernel makes for ``target`` that the report should name (which code path will run)."""
        return None

    @classmethod
    def supports(cls, options: BaseModel, *args: Any) -> bool:
        """Per call: whether the kernel handles these arguments (shapes, dtypes); otherwise the original runs.
        By default the kind's own per-call condition (``KernelKind.fits``), if it has one."""
        fits = KINDS[cls.kind].fits
        return fits is None or fits(*args)

    @classmethod
    def companions(cls, target: Any, options: BaseModel) -> list[tuple[torch.nn.Module, type[MetaKernel]]]:
        """Other modules a patch of ``target`` patches too, each with its kernel class (which receives the module's
        first call parameter); installed and reverted with the entry. The fused loss patches its output head."""
        return []

    @classmethod
    def run(cls, target: Any, options: BaseModel, *args: Any) -> Any:
        """The replacement computation; ``target`` is the patched module, or the original function."""
        raise NotImplementedError(f"{cls.__name__} does not implement run()")

    @classmethod
    def describe(cls) -> str:
        manual = "" if cls.auto_register else " (manual: explicit spec or apply_kernel)"
        return f"{cls.__name__}: {cls.kind} ({cls.type.name}) on {cls.device}{manual}"


Kernel = MetaKernel  # the name earlier engine releases used


def is_kernel_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, MetaKernel) and hasattr(obj, "kind")
