"""``swiglu``: a gate/up/down MLP computing ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch.utils.checkpoint import checkpoint

from engine.kernels.kinds.base import (
    KernelKind,
    KernelType,
    is_layer,
    is_silu,
    mismatch,
    probe_tensor,
    probe_twin,
)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SwiGLUOptions(BaseModel):
    """``recompute``: what backward recomputes instead of keeping it from forward.

    ``activation`` (default): ``silu(gate) * up``, at no extra cost where the down projection is a plain linear.
    ``projections``: gate and up as well, from the MLP's input (one more gate/up GEMM pair per backward, two
    ``[tokens, intermediate]`` tensors less per layer), e.g. for long sequences. Eager only: under
    ``torch.compile`` a kernel that defers to the original leaves the choice to the compiler.
    """

    model_config = ConfigDict(extra="forbid")
    recompute: Literal["activation", "projections"] = "activation"


def recomputed(mlp: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` keeping only ``x`` for backward, which runs ``mlp`` again (any layers: LoRA, hooked, NPU)."""
    if not torch.is_grad_enabled():  # x may not need a gradient while the layers' weights do (LoRA)
        return mlp(x)
    return checkpoint(mlp, x, use_reentrant=False, preserve_rng_state=False)


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation, in the input dtype like transformers."""
    return F.silu(gate) * up


def check(module: Any, options: SwiGLUOptions) -> str | None:
    for name in PROJECTIONS:
        if not is_layer(getattr(module, name, None)):
            return f"module has no `{name}` layer"
    act = getattr(module, "act_fn", None)
    if not is_silu(act):
        return f"activation {type(act).__name__} is not SiLU: SwiGLU would change the math"
    return None


def _in_features(layer: Any) -> int | None:
    weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def probe(module: Any, options: SwiGLUOptions) -> str | None:
    twin = probe_twin(module)
    hidden = _in_features(module.gate_proj)
    if twin is None or hidden is None:
        return None
    weight = getattr(twin.gate_proj, "base_layer", twin.gate_proj).weight
    x = probe_tensor(3, hidden, like=weight)
    with torch.no_grad():
        got = twin.forward(x)
        want = twin.down_proj(reference(twin.gate_proj(x), twin.up_proj(x)))
    return mismatch(got, want)


KIND = KernelKind("swiglu", KernelType.SWIGLU, "module", ("x",), check, probe, SwiGLUOptions)
