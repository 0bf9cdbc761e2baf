"""What every kernel kind declares, and the helpers its plan-time check and probe share.

A *kind* is what a spec entry's ``kernel:`` names (``rms_norm``, ``vision_rope``, ...). Each kind belongs to one
seed :class:`KernelType` (``RMSNORM``, ``ROPE``, ...) and lives in one file of this package holding its options
model, reference math, structural check and numerical probe. A check returns ``None`` when the target fits, else
the reason it does not; a probe runs the target's original code against the reference math on a tiny random
input and returns a reason when they disagree, so a spec that declares the wrong semantics is refused.
"""

from __future__ import annotations

import inspect
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from engine.device import ValueEnum


class KernelType(ValueEnum):
    """The seed's kernel types (plus ATTENTION and EMBEDDING); each spec kernel kind maps onto one (README's table)."""

    RMSNORM = "rmsnorm"
    SWIGLU = "swiglu"
    ROPE = "rope"
    MOE = "moe"
    LINEAR_CROSS_ENTROPY = "linear_cross_entropy"
    ATTENTION = "attention"  # beyond the seed: how attention is dispatched (sdpa_is_causal)
    EMBEDDING = "embedding"  # beyond the seed: the token-embedding lookup and its weight gradient


class NoOptions(BaseModel):
    """A kind that takes no options."""

    model_config = ConfigDict(extra="forbid")


Check = Callable[[Any, Any], "str | None"]


@dataclass(frozen=True)
class KernelKind:
    """One replaceable computation: what it targets, what a kernel receives, and how a target is vetted.

    ``params`` names the target's call parameters a kernel receives, in order; a call that sets any other
    parameter to a non-default value runs the original. ``None`` hands the kernel the raw call instead.
    ``fits``, where set, is the per-call condition every device's kernel of the kind shares (the default
    ``MetaKernel.supports``); a call it refuses runs the original. ``used_by``, for function targets, says why a
    model never calls the function (``None``: it does); by default, no class from the function's own module
    references it.
    """

    name: str
    type: KernelType
    target: Literal["module", "function"]
    params: tuple[str, ...] | None
    check: Check
    probe: Check
    options: type[BaseModel] = NoOptions
    fits: Callable[..., bool] | None = None
    used_by: Callable[[nn.Module, str, str], str | None] | None = None


# Probes run in the target's own dtype; a semantic mistake gives O(1) errors, rounding far less.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Parameters that must be simulated (meta, DTensor) are drawn at random only up to this many elements.
MAX_SIMULATED_ELEMENTS = 1 << 24


def mismatch(got: Any, want: Any) -> str | None:
    """Why two results (tensors or tuples of tensors) differ beyond rounding, or ``None``."""
    gots = got if isinstance(got, tuple | list) else (got,)
    wants = want if isinstance(want, tuple | list) else (want,)
    if len(gots) != len(wants):
        return f"original forward returns {len(gots)} value(s), the declared math {len(wants)}"
    for g, w in zip(gots, wants, strict=True):
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            return f"probe shape mismatch: original gives {shape}, declared math {tuple(w.shape)}"
        err = (g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12)
        if not torch.isfinite(err) or err > PROBE_RTOL.get(w.dtype, 3e-2):
            return f"original forward and the declared kernel math disagree (relative error {err:.2e})"
    return None


def probe_tensor(*shape: int, seed: int = 0, like: torch.Tensor | None = None) -> torch.Tensor:
    """Seeded normal values in fp32 (then ``like``'s device and dtype)."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return t if like is None else t.to(device=like.device, dtype=like.dtype)


def code_names(fn: Any) -> set[str]:
    """Every global and attribute name the (unwrapped) function's code and its nested code reads: what the
    planner and the kinds' checks use to tell whether code calls a function or reads a config field."""
    names: set[str] = set()
    pending = [getattr(inspect.unwrap(fn), "__code__", None)]
    while pending:
        code = pending.pop()
        if isinstance(code, types.CodeType):
            names.update(code.co_names)
            pending += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return names


def methods_read(classes: Iterable[type], names: Iterable[str]) -> bool:
    """Whether a method of any of ``classes`` (its own code, see :func:`code_names`) reads one of ``names``."""
    wanted = set(names)
    for cls in classes:
        for value in vars(cls).values():
            fn = getattr(value, "__func__", value)
            if callable(fn) and not code_names(fn).isdisjoint(wanted):
                return True
    return False


_SILU_PROBE = torch.linspace(-6.0, 6.0, 25)


def is_silu(act: Any) -> bool:
    """Whether ``act`` computes SiLU (nn.SiLU, transformers' SiLUActivation, ...), checked numerically."""
    if not callable(act):
        return False
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(_SILU_PROBE), torch.nn.functional.silu(_SILU_PROBE), atol=1e-6))
    except Exception:
        return False


def is_layer(module: Any) -> bool:
    """A callable sub-layer (nn.Linear, or a wrapper of one such as a PEFT LoRA layer)."""
    return isinstance(module, nn.Module)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
# Instance attributes that replace or wrap the class forward (the engine's own, accelerate's hooks).
_FORWARD_OVERRIDES = ("forward", "_old_forward", "_hf_hook")


def _simulated(t: torch.Tensor | None) -> bool:
    """A tensor without plain local data: meta, or a subclass such as a sharded DTensor."""
    return t is not None and (t.is_meta or type(t) not in (torch.Tensor, nn.Parameter))


def simulation_note(module: nn.Module) -> str | None:
    """What a probe of ``module`` has to simulate, in words for the report (``None``: nothing)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if _simulated(t)]
    if not tensors:
        return None
    kinds = ", ".join(sorted({"meta" if t.is_meta else type(t).__name__ for t in tensors}))
    if sum(t.numel() for t in tensors) > MAX_SIMULATED_ELEMENTS:
        return f"not probed: {kinds} parameters over {MAX_SIMULATED_ELEMENTS} elements to simulate"
    return f"probed on random weights ({kinds} parameters)"


def _plain(t: torch.Tensor | None, seed: int) -> torch.Tensor | None:
    if not _simulated(t):
        return t
    assert t is not None
    local = getattr(t, "to_local", None)
    device = torch.device("cpu") if t.is_meta else (local().device if callable(local) else t.device)
    values = torch.randn(tuple(t.shape), generator=torch.Generator().manual_seed(seed)) * 0.5
    return (values + (1.0 if t.dim() == 1 else 0.0)).to(device=device, dtype=t.dtype)


def _twin(module: nn.Module, seed: int) -> nn.Module:
    twin = object.__new__(type(module))
    state = dict(module.__dict__)
    for name in _FORWARD_OVERRIDES:
        state.pop(name, None)
    for name in _HOOK_DICTS:
        if name in state:
            state[name] = OrderedDict()
    state["_parameters"] = {n: _plain(p, seed + i) for i, (n, p) in enumerate(module._parameters.items())}
    state["_buffers"] = {n: _plain(b, seed + 100 + i) for i, (n, b) in enumerate(module._buffers.items())}
    state["_modules"] = {n: _twin(m, seed + 1000) if m is not None else None for n, m in module._modules.items()}
    twin.__dict__.update(state)
    return twin


def probe_twin(module: nn.Module) -> nn.Module | None:
    """A stand-in of ``module`` to run its class code on, or ``None`` when it is too large to simulate.

    The twin shares plain parameters (nothing is copied or written) and has no hooks and no instance
    forwards, so the class's own forward runs. Parameters without local data (meta, or DTensors sharded by
    FSDP2) are replaced by seeded random tensors of the same shape (see :func:`simulation_note`).
    """
    if (simulation_note(module) or "").startswith("not probed"):
        return None
    return _twin(module, seed=0)
