"""Public entry points: ``apply``, ``apply_available_kernels``, ``apply_kernel``, ``discover_kernels``, ``revert``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from engine import log, patching
from engine.catalog import SPEC_PATH_ENV, find_spec, specs_for_model_type
from engine.device import DEVICE_ENV, DeviceType, detect_device, validate_device
from engine.errors import DeviceMismatchError, KernelUnavailableError, NoSpecError
from engine.kernels.base import MetaKernel, is_kernel_class
from engine.kernels.registry import REGISTRY
from engine.patching import PatchHandle, attach, attached
from engine.planner import Plan, PlannedPatch, Planner, model_type_of
from engine.report import PatchedItem, PatchReport, SkippedItem
from engine.spec import KernelSpec

SpecLike = str | Path | KernelSpec | Mapping[str, Any]
SpecDirs = Iterable[str | Path]
Modules = Iterable[str]  # modules beyond transformers that function targets may name (engine.spec.allow)


def no_spec_message(model: nn.Module) -> str:
    return (
        f"no spec declares model_type {model_type_of(model)!r}: add a spec file (YAML, TOML or .yaml.j2 with "
        f"name, model_types: [{model_type_of(model)}] and entries; see kernel_specs/qwen3.toml) in a folder "
        f"listed in {SPEC_PATH_ENV} or passed as spec_dirs="
    )


def _specs_for(model: nn.Module, spec: SpecLike | None, spec_dirs: SpecDirs, allow: Modules) -> list[KernelSpec]:
    if spec is None:
        return specs_for_model_type(model_type_of(model), spec_dirs, allow)
    chosen = find_spec(spec, spec_dirs, allow)
    if model_type_of(model) not in chosen.model_types:
        log.warn(f"spec {chosen.name!r} is for {chosen.model_types}, the model is {model_type_of(model)!r}")
    return [chosen]


def plan(
    model: nn.Module,
    spec: SpecLike | None = None,
    device: str | None = None,
    include_manual: bool | None = None,
    spec_dirs: SpecDirs = (),
    allow_modules: Modules = (),
) -> Plan:
    """What would be patched, without patching. Manual entries count only with an explicit spec."""
    device = validate_device(device) if device else detect_device()
    specs = _specs_for(model, spec, spec_dirs, allow_modules)
    result = Planner(model, device, spec is not None if include_manual is None else include_manual).plan(specs)
    if not specs:
        result.skipped.append(_no_spec_item(model))
    return result


def _no_spec_item(model: nn.Module) -> SkippedItem:
    return SkippedItem("-", "-", type(model).__name__, no_spec_message(model))


def _patched_item(planned: PlannedPatch) -> PatchedItem:
    if planned.function is not None:
        owner, attr, _ = planned.function
        target, scope, names = f"{owner.__name__}.{attr}", "process-wide function", []
    else:
        target, scope = planned.entry.target.label, "per-instance forward"
        names = [name or "<root>" for name, _ in planned.modules]
    notes = [planned.note] if planned.note else []
    if patching.defers_to_compiler(planned.kernel):
        notes.append("torch.compile sees the original code")
    note = "; ".join(notes) or None
    return PatchedItem(planned.spec, planned.entry.name, planned.kernel.__name__, target, scope, names, note)


def preview(result: Plan) -> PatchReport:
    """The report applying ``result`` would produce, without patching anything."""
    return PatchReport(
        result.device, result.model_type, list(result.specs), [_patched_item(p) for p in result.patches], result.skipped
    )


def install(model: nn.Module, result: Plan, verbose: bool = True) -> PatchHandle:
    """Install every planned patch and keep the handle on ``model``; on a failure, undo what was installed."""
    handle = PatchHandle(PatchReport(result.device, result.model_type, list(result.specs), [], list(result.skipped)))
    try:
        for planned in result.patches:
            item = _patched_item(planned)
            if planned.function is not None:
                owner, attr, _ = planned.function
                handle.functions.append(
                    patching.acquire_function_patch(owner, attr, planned.kernel, planned.options, planned.binder, item)
                )
            for _, module in planned.modules:
                handle.modules.append(
                    patching.install_module_patch(module, planned.kernel, planned.options, planned.binder, item)
                )
            for module, kernel, binder in planned.companions:
                handle.modules.append(patching.install_module_patch(module, kernel, planned.options, binder, item))
            handle.report.patched.append(item)
    except BaseException:
        handle.revert()
        raise
    attach(model, handle)
    if verbose:
        log.emit(logging.INFO, handle.report.summary())
    return handle


def apply(
    model: nn.Module,
    spec: SpecLike | None = None,
    device: str | None = None,
    spec_dirs: SpecDirs = (),
    verbose: bool = True,
    allow_modules: Modules = (),
) -> PatchHandle:
    """Apply a spec (by name, path or object) to ``model``; with no spec, every spec for its model type.

    An explicit spec applies its manual entries too. Returns a handle with ``.report`` and ``.revert()``.
    """
    return install(model, plan(model, spec, device, spec_dirs=spec_dirs, allow_modules=allow_modules), verbose)


def apply_available_kernels(
    model: nn.Module,
    device: str | None = None,
    spec_dirs: SpecDirs = (),
    verbose: bool = True,
    allow_modules: Modules = (),
) -> nn.Module:
    """Patch every automatic kernel that fits ``model`` on the detected device; returns the model.

    A model type no spec declares is reported with a warning saying how to add a spec.
    """
    handle = apply(model, None, device, spec_dirs, verbose, allow_modules)
    if not handle.report.specs:
        log.warn(no_spec_message(model))
    return model


def _check_requested(kernel: Any, device: DeviceType) -> None:
    if not is_kernel_class(kernel):
        raise TypeError(
            f"apply_kernel expects a kernel class (a MetaKernel subclass declaring type and device), got {kernel!r}"
        )
    if kernel.device != device:
        raise DeviceMismatchError(
            f"{kernel.__name__} is a {kernel.device} kernel but this process runs on {device}; "
            f"use the {device} kernel (discover_kernels() lists them) or set {DEVICE_ENV}={kernel.device} "
            "if that device is really present"
        )
    reason = kernel.unavailable_reason()
    if reason:
        raise KernelUnavailableError(f"{kernel.__name__} cannot run here: {reason}")


def apply_kernel(
    model: nn.Module,
    kernel: type[MetaKernel],
    spec_dirs: SpecDirs = (),
    verbose: bool = True,
    allow_modules: Modules = (),
) -> nn.Module:
    """Patch one kernel class into every target its kind has in the model's specs (manual kernels too).

    Raises ``TypeError`` for a non-kernel, :class:`DeviceMismatchError` (a ``ValueError``) for a kernel of
    another device, :class:`KernelUnavailableError` when its runtime is missing, :class:`NoSpecError` when
    no spec declares the model's type.
    """
    device = detect_device()
    _check_requested(kernel, device)
    specs = _specs_for(model, None, spec_dirs, allow_modules)
    if not specs:
        raise NoSpecError(no_spec_message(model))
    result = Planner(model, device, include_manual=True).plan(specs, only_kernel=kernel)
    if not result.patches and not result.skipped:
        names = ",".join(s.name for s in specs)
        result.skipped.append(SkippedItem(names, "-", kernel.kind, f"the model's specs have no {kernel.kind!r} entry"))
    install(model, result, verbose)
    return model


def discover_kernels(
    model: nn.Module | None = None, device: str | None = None, spec_dirs: SpecDirs = (), allow_modules: Modules = ()
) -> list[type[MetaKernel]]:
    """Without a model: the registered kernels of this device. With one: those that patch it (already, or if
    ``apply_available_kernels`` ran now)."""
    device = validate_device(device) if device else detect_device()
    if model is None:
        return REGISTRY.registered(device)
    current = [
        p.installed.kernel for h in handles(model) if h.report.device == device for p in (*h.modules, *h.functions)
    ]
    planned = [p.kernel for p in plan(model, None, device, spec_dirs=spec_dirs, allow_modules=allow_modules).patches]
    return [k for k in dict.fromkeys(current + planned) if is_kernel_class(k)]  # companions are no entry's kernel


def handles(model: nn.Module) -> list[PatchHandle]:
    """Active patch handles on ``model`` and its submodules, oldest first."""
    return [h for _, found in attached(model) for h in found if h.active]


def kernel_report(model: nn.Module) -> PatchReport:
    """The merged report of every active patch on ``model``."""
    merged = PatchReport(device="-", model_type=model_type_of(model))
    for handle in handles(model):
        merged.merge(handle.report)
    return merged


def revert(model: nn.Module) -> None:
    """Undo every patch the engine made on ``model`` and its submodules, newest first."""
    for module, found in list(attached(model)):
        for handle in reversed(found):
            handle.revert()
        del module.__dict__[patching.HANDLES_ATTR]
