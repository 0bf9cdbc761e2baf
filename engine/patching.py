"""Installing and reverting patches, and their lifecycle.

Module targets get a per-instance forward (the class and other instances stay untouched); under an
accelerate hook (``_hf_hook``) the patch replaces the hooked ``_old_forward``, so the hook still moves weights
and inputs around the kernel. Function targets are module attributes, so their patch is process-wide: it is
reference-counted across handles and restored when the last user reverts or is garbage-collected.
Weights are never read into new tensors or written.

Handles live on the patched model (``model.__dict__``), not in a global table, so the engine keeps no model
alive, ``copy.deepcopy`` of a patched model carries its patches (and a handle to revert them), and a
collected model releases its share of every process-wide patch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine import log
from engine.binding import Binder
from engine.errors import PatchConflictError
from engine.report import PatchedItem, PatchReport

HANDLES_ATTR = "_engine_handles"
UNDER_COMPILE_ENV = "ENGINE_UNDER_COMPILE"  # "kernel": every kernel under torch.compile (see MetaKernel.under_compile)
_LOCK = threading.RLock()


def defers_to_compiler(kernel: Any) -> bool:
    """Whether, inside torch.compile, this kernel's patches run the original code (``MetaKernel.under_compile``)."""
    return kernel.under_compile == "original" and os.environ.get(UNDER_COMPILE_ENV) != "kernel"


def _first_tensor(values: tuple[Any, ...]) -> Any:
    for value in values:
        if hasattr(value, "device") and hasattr(value, "dtype"):
            return value
    return None


class PatchedCall:
    """What is installed in place of a forward or a function: the kernel where it applies, else the original.

    ``target`` is the patched module (module targets) or the original function. A call takes the kernel
    path when its arguments bind to the kernel's parameters, its first tensor is on a device the kernel
    serves, and the kernel supports the call (shapes, dtypes); anything else runs ``original`` unchanged.
    """

    def __init__(
        self,
        kernel: Any,
        options: Any,
        original: Callable[..., Any],
        binder: Binder | None,
        target: Any,
        item: PatchedItem,
    ) -> None:
        self.kernel = kernel
        self.options = options
        self.original = original
        self.binder = binder
        self.target = target
        self.item = item
        self.devices = kernel.tensor_devices()
        self.defer_to_compiler = defers_to_compiler(kernel)
        if not isinstance(target, nn.Module):
            functools.update_wrapper(self, original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.defer_to_compiler and torch.compiler.is_compiling():
            return self.original(*args, **kwargs)
        if self.binder is None:  # the kernel takes the raw call
            if self.kernel.supports(self.options, args, kwargs):
                return self.kernel.run(self.target, self.options, args, kwargs)
            return self.original(*args, **kwargs)
        values = self.binder.bind(args, kwargs)
        if values is not None:
            tensor = _first_tensor(values)
            if (
                tensor is not None
                and tensor.device.type in self.devices
                and self.kernel.supports(self.options, *values)
            ):
                return self.kernel.run(self.target, self.options, *values)
        return self.original(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<engine patch {self.item.spec}/{self.item.entry}: {self.kernel.__name__}>"


def patched_call_of(module: nn.Module) -> PatchedCall | None:
    """The engine patch installed on ``module`` (directly, or under an accelerate hook), if any."""
    for attr in ("forward", "_old_forward"):
        value = module.__dict__.get(attr)
        if isinstance(value, PatchedCall):
            return value
    return None


def patched_kernel_of(fn: Any) -> Any:
    """The kernel behind a patched forward or function; ``None`` for original code."""
    return fn.kernel if isinstance(fn, PatchedCall) else None


@dataclass
class ModulePatch:
    module: nn.Module
    attr: str  # "forward", or "_old_forward" under an accelerate hook
    had_previous: bool
    previous: Any
    installed: PatchedCall

    def revert(self) -> None:
        state = self.module.__dict__
        # accelerate may have moved the patch into _old_forward after it was installed (dispatch after patching)
        for attr in (self.attr, "_old_forward", "forward"):
            if state.get(attr) is self.installed:
                if attr == self.attr and self.had_previous:
                    state[attr] = self.previous
                elif attr == self.attr:
                    del state[attr]
                else:  # a hook wraps the patch now: give it the unpatched forward
                    state[attr] = (
                        self.previous if self.had_previous else types.MethodType(type(self.module).forward, self.module)
                    )
                return
        raise PatchConflictError(
            f"forward of {type(self.module).__name__} was replaced after the engine patched it; not reverting"
        )


def install_module_patch(
    module: nn.Module, kernel: Any, options: Any, binder: Binder | None, item: PatchedItem
) -> ModulePatch:
    attr = "_old_forward" if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__ else "forward"
    had = attr in module.__dict__
    previous = module.__dict__.get(attr)
    original = previous if had else types.MethodType(type(module).forward, module)
    installed = PatchedCall(kernel, options, original, binder, module, item)
    module.__dict__[attr] = installed
    return ModulePatch(module, attr, had, previous, installed)


@dataclass
class FunctionPatch:
    """Process-wide state of one patched module attribute (shared, never copied)."""

    owner: types.ModuleType
    attr: str
    original: Callable[..., Any]
    installed: PatchedCall
    users: int = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> FunctionPatch:
        return self

    @property
    def key(self) -> tuple[str, str]:
        return self.owner.__name__, self.attr


FUNCTION_PATCHES: dict[tuple[str, str], FunctionPatch] = {}


def acquire_function_patch(
    owner: types.ModuleType, attr: str, kernel: Any, options: Any, binder: Binder | None, item: PatchedItem
) -> FunctionPatch:
    with _LOCK:
        state = FUNCTION_PATCHES.get((owner.__name__, attr))
        if state is None:
            original = getattr(owner, attr)
            state = FunctionPatch(owner, attr, original, PatchedCall(kernel, options, original, binder, original, item))
            setattr(owner, attr, state.installed)
            FUNCTION_PATCHES[state.key] = state
        state.users += 1
        return state


def release_function_patch(state: FunctionPatch) -> None:
    with _LOCK:
        state.users -= 1
        if state.users > 0:
            return
        FUNCTION_PATCHES.pop(state.key, None)
        if getattr(state.owner, state.attr) is not state.installed:
            raise PatchConflictError(
                f"{'.'.join(state.key)} was replaced after the engine patched it; not restoring the original"
            )
        setattr(state.owner, state.attr, state.original)


@dataclass
class PatchHandle:
    """Result of applying a plan: the report, and :meth:`revert` (also on ``with`` exit)."""

    report: PatchReport
    modules: list[ModulePatch] = field(default_factory=list, repr=False)
    functions: list[FunctionPatch] = field(default_factory=list, repr=False)
    active: bool = True

    def revert(self) -> None:
        """Undo every patch of this handle; shared function patches go when their last user reverts."""
        if not self.active:
            return
        self.active = False
        problems: list[str] = []
        for patch in reversed(self.modules):
            try:
                patch.revert()
            except PatchConflictError as exc:
                problems.append(str(exc))
        for state in reversed(self.functions):
            try:
                release_function_patch(state)
            except PatchConflictError as exc:
                problems.append(str(exc))
        for problem in problems:
            log.warn(problem)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchHandle:
        """The copy's modules are the copied model's; it takes its own share of each function patch."""
        twin = PatchHandle(copy.deepcopy(self.report, memo), copy.deepcopy(self.modules, memo), list(self.functions))
        twin.active = self.active
        if twin.active:
            with _LOCK:
                for state in twin.functions:
                    state.users += 1
        return twin

    def __del__(self) -> None:
        # A handle dies with its model (or when nothing references it): release the process-wide patches it
        # holds; the module patches die with the modules.
        if getattr(self, "active", False):
            self.active = False
            for state in getattr(self, "functions", ()):
                with contextlib.suppress(Exception):  # never raise from a finalizer (also at interpreter exit)
                    release_function_patch(state)


def attach(model: nn.Module, handle: PatchHandle) -> PatchHandle:
    """Keep ``handle`` on the model it patched."""
    model.__dict__.setdefault(HANDLES_ATTR, []).append(handle)
    return handle


def attached(model: nn.Module) -> Iterator[tuple[nn.Module, list[PatchHandle]]]:
    """Every module of ``model`` (itself included) that holds handles, with its handle list."""
    for module in model.modules():
        handles = module.__dict__.get(HANDLES_ATTR)
        if handles:
            yield module, handles
