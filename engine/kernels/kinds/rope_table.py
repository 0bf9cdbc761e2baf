"""``rope_table``: a rotary-embedding module's ``(cos, sin)`` table, materialised once per forward under compile.

Target: a transformers ``*RotaryEmbedding`` module whose ``forward(x, position_ids)`` returns
``cos(p * inv_freq) * s`` and ``sin(p * inv_freq) * s`` (frequencies repeated twice along the last dim, ``s`` the
module's ``attention_scaling``) in ``x``'s dtype, with a fixed ``inv_freq`` buffer: default, linear, llama3,
yarn and the other static rope types. ``dynamic`` and ``longrope`` update ``inv_freq`` in forward and are refused,
and so are multimodal tables (a class that reads ``mrope_section``: MRoPE mixes three rows of position ids, which
it also builds from the 2-D ids a probe gives it, so only the code tells it apart). Calls with other than 2-D
position ids run the module's forward.

Why: the table is a pointwise function of the positions, so Inductor inlines it into every kernel that reads it
and recomputes ``cos``/``sin`` for each element of each head of each layer's rotary (forward and backward) instead
of loading them. Behind an operator the compiler cannot see into, the table is computed once and read; measured
in ``benchmarks/README.md``. Eager calls gain nothing from this and run the module's own forward.
"""

from __future__ import annotations

import inspect
from numbers import Real
from typing import Any

import torch

from engine.kernels.kinds.base import (
    KernelKind,
    KernelType,
    NoOptions,
    methods_read,
    mismatch,
    probe_tensor,
    probe_twin,
)

# rope types whose forward rewrites inv_freq from the positions (transformers' dynamic_rope_update)
UPDATING_ROPE_TYPES = ("dynamic", "longrope")


def reference(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' table: fp32 angles ``p * inv_freq`` (an exact product), repeated, ``cos``/``sin``, scaled, cast."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def scaling_of(module: Any) -> float | None:
    """The module's ``attention_scaling`` as a float (``None`` if it has none or it is not a real number)."""
    value = getattr(module, "attention_scaling", None)
    return float(value) if isinstance(value, Real) and not isinstance(value, bool) else None


def check(module: Any, options: NoOptions) -> str | None:
    inv_freq = getattr(module, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        return "module has no 1-D floating `inv_freq` buffer"
    if scaling_of(module) is None:
        return "module has no numeric `attention_scaling`"
    rope_type = getattr(module, "rope_type", "default")
    if not isinstance(rope_type, str):
        return f"rope_type is {type(rope_type).__name__} (one table per layer type), not one rope type"
    if any(updating in rope_type for updating in UPDATING_ROPE_TYPES):
        return f"rope_type {rope_type!r} updates inv_freq from the positions in forward; the table op keeps it fixed"
    if hasattr(module, "mrope_section") or methods_read(type(module).__mro__, ["mrope_section"]):
        return "a multimodal (MRoPE) table: its sections mix three rows of position ids (kind `mrope`)"
    try:
        params = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return "forward has no inspectable signature"
    if params[1:3] != ["x", "position_ids"]:
        return f"forward takes ({', '.join(params[1:])}), expected (x, position_ids)"
    return None


def probe(module: Any, options: NoOptions) -> str | None:
    """The class forward against :func:`reference` on two rows of positions, one of them large (fp32 angles)."""
    twin, scaling = probe_twin(module), scaling_of(module)
    if twin is None or scaling is None:
        return None  # too large to simulate, or refused by the check
    x = probe_tensor(2, 5, 8, like=twin.inv_freq)
    position_ids = torch.tensor([[0, 1, 2, 3, 4], [4093, 4094, 4095, 4096, 4097]], device=x.device)
    with torch.no_grad():
        want = reference(twin.inv_freq, position_ids, scaling, x.dtype)
        return mismatch(twin.forward(x, position_ids), want)


def fits(x: Any, position_ids: Any) -> bool:
    """Per call: a floating ``x`` and 2-D position ids (anything else runs the module's forward)."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and isinstance(position_ids, torch.Tensor)
        and position_ids.dim() == 2
    )


KIND = KernelKind("rope_table", KernelType.ROPE, "module", ("x", "position_ids"), check, probe, fits=fits)
