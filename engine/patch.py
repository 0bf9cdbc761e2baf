"""Installing and reverting patches.

Module targets get a per-instance ``forward`` (the class and other instances stay untouched). Function targets
are module-level attributes, so their patch is process-wide; it is reference-counted across handles and
restored when the last handle reverts. Weights are never read into new tensors or written.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from engine.errors import PatchConflictError
from engine.kernels.base import Kernel, first_tensor
from engine.report import PatchedItem, PatchReport

if TYPE_CHECKING:
    from engine.resolve import Plan, PlannedPatch

logger = logging.getLogger("engine")
_KERNEL_ATTR = "__engine_kernel__"
_LOCK = threading.RLock()


def patched_kernel_of(fn: Any) -> type[Kernel] | None:
    """The kernel behind a patched forward or function, ``None`` for original code."""
    return getattr(getattr(fn, "__func__", fn), _KERNEL_ATTR, None)


def is_patched_function(fn: Any) -> bool:
    return patched_kernel_of(fn) is not None


def _make_module_forward(kernel: type[Kernel], options: Any, previous: Callable[..., Any] | None) -> Callable:
    """A function to bind to a module as its ``forward``; falls back to the original off-device."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        tensor = first_tensor(args, kwargs)
        if tensor is not None and kernel.runs_on(tensor):
            return kernel.module_forward(self, options, *args, **kwargs)
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)

    setattr(forward, _KERNEL_ATTR, kernel)
    return forward


@dataclass
class _ModulePatch:
    module: nn.Module
    had_instance_forward: bool
    previous: Any
    installed: Any

    def revert(self) -> None:
        current = self.module.__dict__.get("forward")
        if current is not self.installed:
            raise PatchConflictError(
                f"forward of {type(self.module).__name__} was replaced after the engine patched it; not reverting"
            )
        if self.had_instance_forward:
            self.module.__dict__["forward"] = self.previous
        else:
            del self.module.__dict__["forward"]


def _install_module_patch(module: nn.Module, kernel: type[Kernel], options: Any) -> _ModulePatch:
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    fn = _make_module_forward(kernel, options, previous if had else None)
    bound = types.MethodType(fn, module)
    module.__dict__["forward"] = bound
    return _ModulePatch(module, had, previous, bound)


@dataclass
class _FunctionPatch:
    """Process-wide state of one patched module attribute."""

    owner: types.ModuleType
    attr: str
    original: Callable[..., Any]
    replacement: Callable[..., Any]
    users: int = 0


_FUNCTION_PATCHES: dict[tuple[str, str], _FunctionPatch] = {}


def _make_function(kernel: type[Kernel], options: Any, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def replacement(*args: Any, **kwargs: Any) -> Any:
        tensor = first_tensor(args, kwargs)
        if tensor is not None and kernel.runs_on(tensor):
            return kernel.function(original, options, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(replacement, _KERNEL_ATTR, kernel)
    return replacement


def _acquire_function_patch(owner: types.ModuleType, attr: str, kernel: type[Kernel], options: Any) -> _FunctionPatch:
    key = (owner.__name__, attr)
    with _LOCK:
        state = _FUNCTION_PATCHES.get(key)
        if state is None:
            original = getattr(owner, attr)
            state = _FunctionPatch(owner, attr, original, _make_function(kernel, options, original))
            setattr(owner, attr, state.replacement)
            _FUNCTION_PATCHES[key] = state
        state.users += 1
        return state


def _release_function_patch(state: _FunctionPatch) -> None:
    key = (state.owner.__name__, state.attr)
    with _LOCK:
        state.users -= 1
        if state.users > 0:
            return
        del _FUNCTION_PATCHES[key]
        if getattr(state.owner, state.attr) is not state.replacement:
            raise PatchConflictError(
                f"{key[0]}.{key[1]} was replaced after the engine patched it; not restoring the original"
            )
        setattr(state.owner, state.attr, state.original)


@dataclass
class PatchHandle:
    """Result of applying a plan: the report, and :meth:`revert` (also on ``with`` exit)."""

    report: PatchReport
    _modules: list[_ModulePatch] = field(default_factory=list, repr=False)
    _functions: list[_FunctionPatch] = field(default_factory=list, repr=False)
    active: bool = True

    def revert(self) -> None:
        """Undo every patch of this handle; shared function patches go when their last user reverts."""
        if not self.active:
            return
        errors: list[str] = []
        for patch in reversed(self._modules):
            try:
                patch.revert()
            except PatchConflictError as exc:
                errors.append(str(exc))
        for state in reversed(self._functions):
            try:
                _release_function_patch(state)
            except PatchConflictError as exc:
                errors.append(str(exc))
        self.active = False
        for message in errors:
            logger.warning("engine: %s", message)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def _scope_of(planned: PlannedPatch) -> str:
    return "process-wide function" if planned.function else "per-instance forward"


def _patched_item(planned: PlannedPatch) -> PatchedItem:
    if planned.function is not None:
        owner, attr, _ = planned.function
        target, names = f"{owner.__name__}.{attr}", []
    else:
        target, names = planned.entry.target.label, [name or "<root>" for name, _ in planned.modules]
    return PatchedItem(planned.spec, planned.entry.name, planned.kernel.__name__, target, _scope_of(planned), names)


def preview(plan: Plan) -> PatchReport:
    """The report :func:`apply_plan` would produce, without patching anything."""
    return PatchReport(
        plan.device,
        plan.model_type,
        list(plan.specs),
        [_patched_item(p) for p in plan.patches],
        list(plan.skipped),
    )


def apply_plan(plan: Plan) -> PatchHandle:
    """Install every planned patch; on any failure, revert what was installed and re-raise."""
    report = PatchReport(plan.device, plan.model_type, list(plan.specs), [], list(plan.skipped))
    handle = PatchHandle(report)
    try:
        for planned in plan.patches:
            if planned.function is not None:
                owner, attr, _ = planned.function
                handle._functions.append(_acquire_function_patch(owner, attr, planned.kernel, planned.options))
            for _, module in planned.modules:
                handle._modules.append(_install_module_patch(module, planned.kernel, planned.options))
            report.patched.append(_patched_item(planned))
    except BaseException:
        handle.revert()
        raise
    return handle
