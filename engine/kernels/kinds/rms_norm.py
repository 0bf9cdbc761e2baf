"""``rms_norm``: an RMSNorm module, plain ``w * x`` or offset ``(1 + w) * x``, with llama or gemma casting."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from engine.kernels.kinds.base import KernelKind, KernelType, mismatch, probe_tensor, probe_twin

Casting = Literal["llama", "gemma"]


class RMSNormOptions(BaseModel):
    """``weight_offset=1.0`` for ``(1 + w)`` norms; ``casting`` picks where the output is rounded."""

    model_config = ConfigDict(extra="forbid")
    weight_offset: float = 0.0
    casting: Casting = "llama"


def reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0, casting: Casting = "llama"
) -> torch.Tensor:
    """``llama``: ``(w + offset) * (x_f32 * rstd).to(x.dtype)``; ``gemma``: all in fp32, cast at the end."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (normed * (weight.float() + weight_offset)).to(x.dtype)
    scale = weight + weight_offset if weight_offset else weight
    return scale * normed.to(x.dtype)


def epsilon(module: nn.Module) -> float | None:
    """The module's epsilon, under any of the names transformers uses."""
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float | int) and not isinstance(value, bool):
            return float(value)
    return None


def check(module: Any, options: RMSNormOptions) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "module has no 1-D `weight`"
    if epsilon(module) is None:
        return "module has no `variance_epsilon`/`eps` attribute"
    return None


def probe(module: Any, options: RMSNormOptions) -> str | None:
    twin = probe_twin(module)
    if twin is None:
        return None
    x = probe_tensor(3, twin.weight.shape[0], like=twin.weight)
    with torch.no_grad():
        got = twin.forward(x)
        want = reference(x, twin.weight, epsilon(module) or 0.0, options.weight_offset, options.casting)
    return mismatch(got, want)


KIND = KernelKind("rms_norm", KernelType.RMSNORM, "module", ("hidden_states",), check, probe, RMSNormOptions)
