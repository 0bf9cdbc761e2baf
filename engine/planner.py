"""Spec x device x model -> plan: which targets each entry patches, and why every other entry is skipped.

The one rule for manual kernels lives here (:func:`is_automatic`). Nothing in planning raises for a bad
target: a target that does not fit, whose probe disagrees or whose check or probe fails is a reported skip.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pydantic import BaseModel
from torch import nn

from engine.binding import Binder, binder_for
from engine.kernels.kinds import KINDS, KernelKind
from engine.kernels.kinds.base import methods_read, simulation_note
from engine.kernels.registry import REGISTRY
from engine.patching import PatchedCall, patched_call_of
from engine.report import SkippedItem
from engine.spec import KernelSpec, SpecEntry


@dataclass
class PlannedPatch:
    spec: str
    entry: SpecEntry
    kernel: Any  # a MetaKernel subclass
    options: BaseModel
    binder: Binder | None
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    function: tuple[types.ModuleType, str, Callable[..., Any]] | None = None
    note: str | None = None
    companions: list[tuple[nn.Module, Any, Binder]] = field(default_factory=list)  # (module, kernel class, binder)


@dataclass
class Plan:
    device: str
    model_type: str
    specs: list[str]
    patches: list[PlannedPatch] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)


def is_automatic(entry: SpecEntry, kernel: Any) -> bool:
    """THE rule for manual kernels: the spec entry's ``auto_register`` when it sets one, else the class's.

    Automatic entries are applied by ``apply_available_kernels``, ``use_v1_kernels`` and
    ``engine.apply(model)`` without a spec; manual ones only by an explicit spec or ``apply_kernel``.
    """
    return entry.auto_register if entry.auto_register is not None else bool(kernel.auto_register)


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


_MISSING = object()


def _config_value(model: nn.Module, key: str) -> Any:
    """``key`` on the config, else on its text config (multimodal models keep LM fields there)."""
    config = getattr(model, "config", None)
    if config is None:
        return _MISSING
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    for cfg in (config, text):
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


def class_matches(module: nn.Module, wanted: str) -> bool:
    """By name (or dotted path) anywhere in the class's MRO, so FSDP2's ``FSDP<Name>`` subclasses match."""
    for cls in type(module).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}" if "." in wanted else cls.__name__
        if name == wanted:
            return True
    return False


def _model_calls(model: nn.Module, owner: str, attr: str) -> str | None:
    """Why the model never calls ``owner.attr`` (judged from its classes' code), or ``None`` when it does."""
    classes = {cls for m in model.modules() for cls in type(m).__mro__ if cls.__module__ == owner}
    if not classes:
        return f"the model has no module from {owner}, so it never calls {attr}"
    if methods_read(classes, [attr]):
        return None
    return f"no {owner} class the model uses calls {attr}"


def _resolve_function(path: str) -> tuple[types.ModuleType, str, Callable[..., Any]] | str:
    module_path, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_path)
    except ImportError as exc:
        return f"cannot import {module_path}: {exc}"
    fn = getattr(module, attr, None)
    if fn is None:
        return f"{module_path} has no attribute {attr!r} (changed transformers version?)"
    return module, attr, fn


Outcome = tuple[PlannedPatch | None, list[SkippedItem]]


class Planner:
    """Builds a :class:`Plan` for one model on one device."""

    def __init__(self, model: nn.Module, device: str, include_manual: bool) -> None:
        self.model = model
        self.device = str(device)
        self.include_manual = include_manual

    def plan(self, specs: list[KernelSpec], only_kernel: Any = None) -> Plan:
        plan = Plan(self.device, model_type_of(self.model), [s.name for s in specs])
        for spec in specs:
            for entry in spec.entries:
                if only_kernel is not None and entry.kernel != only_kernel.kind:
                    continue
                patch, notes = self._plan_entry(spec, entry, only_kernel)
                if patch is not None:
                    plan.patches.append(patch)
                plan.skipped += notes
        return plan

    @staticmethod
    def _skip(spec: KernelSpec, entry: SpecEntry, reason: str, notes: list[SkippedItem] | None = None) -> Outcome:
        return None, [*(notes or []), SkippedItem(spec.name, entry.name, entry.target.label, reason)]

    def _plan_entry(self, spec: KernelSpec, entry: SpecEntry, only_kernel: Any) -> Outcome:
        if entry.devices is not None and self.device not in entry.devices:
            return self._skip(spec, entry, f"entry is restricted to devices {', '.join(entry.devices)}")
        if entry.transformers and Version(transformers.__version__) not in SpecifierSet(entry.transformers):
            return self._skip(spec, entry, f"transformers {transformers.__version__} is outside {entry.transformers}")
        unmet = _unmet_condition(self.model, entry.when)
        if unmet:
            return self._skip(spec, entry, unmet)
        kernel = only_kernel or REGISTRY.get(entry.kernel, self.device)
        if kernel is None:
            serving = ", ".join(REGISTRY.devices_for(entry.kernel)) or "none"
            return self._skip(
                spec, entry, f"no {entry.kernel!r} kernel for device {self.device!r} (kernels exist for: {serving})"
            )
        if not self.include_manual and not is_automatic(entry, kernel):
            source = "spec entry" if entry.auto_register is not None else f"{kernel.__name__}"
            return self._skip(
                spec,
                entry,
                f"manual ({source} sets auto_register: false); apply it with engine.apply(model, spec={spec.name!r})",
            )
        unavailable = kernel.unavailable_reason()
        if unavailable:
            return self._skip(spec, entry, f"{kernel.__name__} unavailable: {unavailable}; original kept")
        kind = KINDS[entry.kernel]
        if entry.target.function:
            return self._plan_function(spec, entry, kind, kernel)
        return self._plan_modules(spec, entry, kind, kernel)

    def _vet(self, kind: KernelKind, kernel: Any, target: Any, options: BaseModel) -> str | None:
        """The kind's check, the device kernel's limits, then the probe; an exception in any is a reason."""
        try:
            return kind.check(target, options) or kernel.incompatibility(target, options) or kind.probe(target, options)
        except Exception as exc:
            return f"target check failed: {type(exc).__name__}: {exc}"

    def _plan_function(self, spec: KernelSpec, entry: SpecEntry, kind: KernelKind, kernel: Any) -> Outcome:
        refused = entry.target.import_refusal()  # validation refuses it first; this guards hand-built targets
        if refused:
            return self._skip(spec, entry, refused)
        resolved = _resolve_function(entry.target.function or "")
        if isinstance(resolved, str):
            return self._skip(spec, entry, resolved)
        owner, attr, fn = resolved
        unused = (kind.used_by or _model_calls)(self.model, owner.__name__, attr)
        if unused:
            return self._skip(spec, entry, unused)
        options = entry.parsed_options
        if isinstance(fn, PatchedCall):
            if fn.kernel is not kernel:
                return self._skip(spec, entry, f"already patched process-wide by {fn.kernel.__name__}")
            return PlannedPatch(spec.name, entry, kernel, options, fn.binder, function=(owner, attr, fn)), []
        problem = self._vet(kind, kernel, fn, options)
        if problem:
            return self._skip(spec, entry, problem)
        binder = binder_for(fn, len(kind.params), drop_self=False) if kind.params is not None else None
        if isinstance(binder, str):
            return self._skip(spec, entry, binder)
        return PlannedPatch(spec.name, entry, kernel, options, binder, function=(owner, attr, fn)), []

    def _plan_modules(self, spec: KernelSpec, entry: SpecEntry, kind: KernelKind, kernel: Any) -> Outcome:
        wanted = entry.target.module_class or ""
        found = [(n, m) for n, m in self.model.named_modules() if class_matches(m, wanted)]
        if not found:
            return self._skip(spec, entry, f"model has no {wanted} modules")
        fresh = [(n, m) for n, m in found if patched_call_of(m) is None]
        notes: list[SkippedItem] = []
        if len(fresh) < len(found):
            _, notes = self._skip(spec, entry, f"{len(found) - len(fresh)} module(s) already patched; left as they are")
        if not fresh:
            return None, notes
        sample = fresh[0][1]
        options = entry.parsed_options
        problem = self._vet(kind, kernel, sample, options)
        if problem:
            return self._skip(spec, entry, problem, notes)
        binder: Binder | str | None = None
        if kind.params is not None:
            binder = binder_for(type(sample).forward, len(kind.params), drop_self=True)
            if isinstance(binder, str):
                return self._skip(spec, entry, binder, notes)
        companions = []
        for module, companion in (pair for _, m in fresh for pair in kernel.companions(m, options)):
            companion_binder = binder_for(type(module).forward, 1, drop_self=True)
            if patched_call_of(module) is not None or isinstance(companion_binder, str):
                why = "is already patched" if isinstance(companion_binder, Binder) else companion_binder
                return self._skip(spec, entry, f"{type(module).__name__} (patched with it): {why}", notes)
            companions.append((module, companion, companion_binder))
        note = "; ".join(filter(None, (_plan_note(kernel, sample, options), simulation_note(sample)))) or None
        planned = PlannedPatch(spec.name, entry, kernel, options, binder, modules=fresh, note=note)
        planned.companions = companions
        return planned, notes


def _plan_note(kernel: Any, target: Any, options: BaseModel) -> str | None:
    """The kernel's own note for the report; a failure to say is itself said, never a failed plan."""
    try:
        return kernel.plan_note(target, options)
    except Exception as exc:
        return f"no plan note ({type(exc).__name__}: {exc})"
