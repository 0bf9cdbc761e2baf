"""Spec x device x model -> plan: which targets each entry patches, and why each other entry is skipped."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pydantic import BaseModel
from torch import nn

from engine.kernels.base import Kernel
from engine.patch import is_patched_function, patched_kernel_of
from engine.registry import REGISTRY
from engine.report import SkippedItem
from engine.spec import KernelSpec, SpecEntry

_MISSING = object()


@dataclass
class PlannedPatch:
    spec: str
    entry: SpecEntry
    kernel: type[Kernel]
    options: BaseModel
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    function: tuple[ModuleType, str, Callable[..., Any]] | None = None


@dataclass
class Plan:
    device: str
    model_type: str
    specs: list[str]
    patches: list[PlannedPatch] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _config_value(model: nn.Module, key: str) -> Any:
    """Look ``key`` up on the config, then on its text config (multimodal models keep LM fields there)."""
    config = getattr(model, "config", None)
    if config is None:
        return _MISSING
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        if cfg is not None and hasattr(cfg, key):
            return getattr(cfg, key)
    return _MISSING


def _unmet_condition(model: nn.Module, when: dict[str, Any]) -> str | None:
    for key, wanted in when.items():
        value = _config_value(model, key)
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if value is _MISSING:
            return f"config has no {key!r} (entry requires {key} in {allowed})"
        if value not in allowed:
            return f"config.{key} is {value!r}; entry requires one of {allowed}"
    return None


def _class_matches(module: nn.Module, wanted: str) -> bool:
    cls = type(module)
    if "." in wanted:
        return f"{cls.__module__}.{cls.__qualname__}" == wanted
    return cls.__name__ == wanted


def _resolve_function(path: str) -> tuple[ModuleType, str, Callable[..., Any]] | str:
    module_path, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_path)
    except ImportError as exc:
        return f"cannot import {module_path}: {exc}"
    fn = getattr(module, attr, None)
    if fn is None:
        return f"{module_path} has no attribute {attr!r} (changed transformers version?)"
    return module, attr, fn


Outcome = tuple[PlannedPatch | None, list[SkippedItem]]  # a patch (or none) and what was skipped, with reasons


class Planner:
    """Builds a :class:`Plan` for one model on one device."""

    def __init__(self, model: nn.Module, device: str, include_manual: bool, probe: bool = True) -> None:
        self.model = model
        self.device = device
        self.include_manual = include_manual
        self.probe = probe

    def plan(self, specs: list[KernelSpec], only_kernel: type[Kernel] | None = None) -> Plan:
        plan = Plan(self.device, model_type_of(self.model), [s.name for s in specs])
        for spec in specs:
            for entry in spec.entries:
                if only_kernel is not None and entry.kernel != only_kernel.type:
                    continue
                patch, notes = self._plan_entry(spec, entry, only_kernel)
                if patch is not None:
                    plan.patches.append(patch)
                plan.skipped += notes
        return plan

    def _skip(self, spec: KernelSpec, entry: SpecEntry, reason: str, notes: list[SkippedItem] | None = None) -> Outcome:
        return None, [*(notes or []), SkippedItem(spec.name, entry.name, entry.target.label, reason)]

    def _plan_entry(self, spec: KernelSpec, entry: SpecEntry, only_kernel: type[Kernel] | None) -> Outcome:
        if not entry.auto_register and not self.include_manual:
            return self._skip(
                spec,
                entry,
                f"manual entry (auto_register: false); apply it with engine.apply(model, spec={spec.name!r})",
            )
        if self.device not in entry.devices:
            return self._skip(
                spec,
                entry,
                f"entry is not declared for device {self.device!r} (devices: {', '.join(entry.devices)})",
            )
        if entry.transformers and Version(transformers.__version__) not in SpecifierSet(entry.transformers):
            return self._skip(spec, entry, f"transformers {transformers.__version__} is outside {entry.transformers}")
        unmet = _unmet_condition(self.model, entry.when)
        if unmet:
            return self._skip(spec, entry, unmet)
        kernel = only_kernel or REGISTRY.get(entry.kernel, self.device)
        if kernel is None:
            return self._skip(
                spec,
                entry,
                f"no {entry.kernel!r} kernel registered for device {self.device!r}; original forward kept",
            )
        if not kernel.auto_register and not self.include_manual:
            return self._skip(spec, entry, f"{kernel.__name__} is manual (auto_register = False)")
        unavailable = kernel.unavailable_reason()
        if unavailable:
            return self._skip(spec, entry, f"{kernel.__name__} unavailable: {unavailable}; original kept")
        options = kernel.kernel_type().options.model_validate(entry.options)
        if entry.target.function:
            return self._plan_function(spec, entry, kernel, options)
        return self._plan_modules(spec, entry, kernel, options)

    def _target_problem(self, kernel: type[Kernel], target: Any, options: BaseModel) -> str | None:
        problem = kernel.kernel_type().check(target, options) or kernel.incompatibility(target, options)
        if problem is None and self.probe:
            problem = kernel.kernel_type().probe(target, options)
        return problem

    def _plan_function(self, spec: KernelSpec, entry: SpecEntry, kernel: type[Kernel], options: BaseModel) -> Outcome:
        resolved = _resolve_function(entry.target.function or "")
        if isinstance(resolved, str):
            return self._skip(spec, entry, resolved)
        module, attr, fn = resolved
        if is_patched_function(fn):
            owner = patched_kernel_of(fn)
            if owner is not kernel:
                return self._skip(spec, entry, f"already patched process-wide by {owner.__name__}")
        else:
            problem = self._target_problem(kernel, fn, options)
            if problem:
                return self._skip(spec, entry, problem)
        return PlannedPatch(spec.name, entry, kernel, options, function=(module, attr, fn)), []

    def _plan_modules(self, spec: KernelSpec, entry: SpecEntry, kernel: type[Kernel], options: BaseModel) -> Outcome:
        wanted = entry.target.module_class or ""
        found = [(n, m) for n, m in self.model.named_modules() if _class_matches(m, wanted)]
        if not found:
            return self._skip(spec, entry, f"model has no {wanted} modules")
        fresh = [(n, m) for n, m in found if patched_kernel_of(m.__dict__.get("forward")) is None]
        notes: list[SkippedItem] = []
        if len(fresh) < len(found):
            _, notes = self._skip(spec, entry, f"{len(found) - len(fresh)} module(s) already patched; left as they are")
        if not fresh:
            return None, notes
        problem = self._target_problem(kernel, fresh[0][1], options)
        if problem:
            return self._skip(spec, entry, problem, notes)
        return PlannedPatch(spec.name, entry, kernel, options, modules=fresh), notes
