"""Public entry points: ``apply``, ``apply_available_kernels``, ``apply_kernel``, ``discover_kernels``, ``revert``."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from engine.catalog import find_spec, specs_for_model_type
from engine.device import detect_device, validate_device
from engine.errors import EngineError, KernelUnavailableError
from engine.kernels.base import Kernel
from engine.patch import PatchHandle, apply_plan
from engine.report import PatchReport, SkippedItem
from engine.resolve import Plan, Planner, model_type_of
from engine.spec import KernelSpec

logger = logging.getLogger("engine")
_HANDLES: weakref.WeakKeyDictionary[nn.Module, list[PatchHandle]] = weakref.WeakKeyDictionary()

SpecLike = str | Path | KernelSpec


def _specs_for(model: nn.Module, spec: SpecLike | None, spec_dirs: Iterable[str | Path]) -> list[KernelSpec]:
    if spec is not None:
        chosen = find_spec(spec, spec_dirs)
        model_type = model_type_of(model)
        if model_type not in chosen.model_types:
            logger.warning("engine: spec %r is for %s, model is %r", chosen.name, chosen.model_types, model_type)
        return [chosen]
    return specs_for_model_type(model_type_of(model), spec_dirs)


def plan(
    model: nn.Module,
    spec: SpecLike | None = None,
    device: str | None = None,
    include_manual: bool | None = None,
    spec_dirs: Iterable[str | Path] = (),
    probe: bool = True,
) -> Plan:
    """What would be patched, without patching. Manual entries count only with an explicit spec."""
    device = validate_device(device) if device else detect_device()
    manual = spec is not None if include_manual is None else include_manual
    specs = _specs_for(model, spec, spec_dirs)
    result = Planner(model, device, manual, probe).plan(specs)
    if not specs:
        result.skipped.append(
            SkippedItem("-", "-", type(model).__name__, f"no spec declares model_type {model_type_of(model)!r}")
        )
    return result


def _record(model: nn.Module, handle: PatchHandle, verbose: bool) -> PatchHandle:
    _HANDLES.setdefault(model, []).append(handle)
    if verbose:
        logger.info("%s", handle.report.summary())
    return handle


def apply(
    model: nn.Module,
    spec: SpecLike | None = None,
    device: str | None = None,
    spec_dirs: Iterable[str | Path] = (),
    verbose: bool = True,
) -> PatchHandle:
    """Apply a spec (by name, path or object) to ``model``; with no spec, every spec for its model type.

    An explicit spec applies its manual entries too. Returns a handle with ``.report`` and ``.revert()``.
    """
    return _record(model, apply_plan(plan(model, spec, device, spec_dirs=spec_dirs)), verbose)


def apply_available_kernels(
    model: nn.Module, device: str | None = None, spec_dirs: Iterable[str | Path] = (), verbose: bool = True
) -> nn.Module:
    """Patch every automatic kernel that fits ``model`` on the detected device; returns the model."""
    apply(model, None, device, spec_dirs, verbose)
    return model


def apply_kernel(
    model: nn.Module, kernel: type[Kernel], spec_dirs: Iterable[str | Path] = (), verbose: bool = True
) -> nn.Module:
    """Patch one kernel class into every target its type has in the model's specs (manual kernels too).

    Raises :class:`KernelUnavailableError` when the kernel cannot run here.
    """
    reason = kernel.unavailable_reason()
    if reason:
        raise KernelUnavailableError(f"{kernel.__name__} cannot run here: {reason}")
    specs = _specs_for(model, None, spec_dirs)
    if not specs:
        raise EngineError(f"no spec declares model_type {model_type_of(model)!r}; pass one to engine.apply")
    result = Planner(model, kernel.device, include_manual=True).plan(specs, only_kernel=kernel)
    if not result.patches and not result.skipped:
        result.skipped.append(
            SkippedItem(
                ",".join(s.name for s in specs),
                "-",
                kernel.type,
                f"no entry of kernel type {kernel.type!r} in the model's specs",
            )
        )
    _record(model, apply_plan(result), verbose)
    return model


def discover_kernels(
    model: nn.Module, device: str | None = None, spec_dirs: Iterable[str | Path] = ()
) -> list[type[Kernel]]:
    """Kernel classes that ``apply_available_kernels`` would patch into ``model`` (each has .type, .device)."""
    found: list[type[Kernel]] = []
    for planned in plan(model, None, device, spec_dirs=spec_dirs).patches:
        if planned.kernel not in found:
            found.append(planned.kernel)
    return found


def handles(model: nn.Module) -> list[PatchHandle]:
    """Active patch handles recorded for ``model``, oldest first."""
    return [h for h in _HANDLES.get(model, []) if h.active]


def kernel_report(model: nn.Module) -> PatchReport:
    """The merged report of every active patch on ``model``."""
    merged = PatchReport(device="-", model_type=model_type_of(model))
    for handle in handles(model):
        merged.device = handle.report.device
        merged.merge(handle.report)
    return merged


def revert(model: nn.Module) -> None:
    """Undo every patch the engine made on ``model``, newest first."""
    for handle in reversed(_HANDLES.pop(model, [])):
        handle.revert()
