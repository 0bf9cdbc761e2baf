"""The kernel types the engine knows: what they replace, their options, and the checks every device shares.

A check returns ``None`` when the target fits, else the reason it does not. A probe runs the target's original
code and the reference math on a tiny random input and returns a reason when they disagree: it catches specs
that declare the wrong semantics (a ``(1 + w)`` norm declared plain, a gelu MLP declared SwiGLU).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.options import MRopeOptions, NoOptions, RMSNormOptions
from engine.kernels.reference import (
    moe_experts_reference,
    mrope_axis_table,
    mrope_cos_sin_reference,
    rms_norm_reference,
    rope_reference,
    swiglu_reference,
    vision_rope_reference,
)

TargetKind = Literal["module", "function"]
Check = Callable[[Any, BaseModel], "str | None"]

# Probes run in the module's own dtype; semantic mistakes give O(1) errors, rounding far less.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class KernelType:
    """One kind of replaceable computation."""

    name: str
    target_kind: TargetKind
    options: type[BaseModel]
    check: Check
    probe: Check
    summary: str


def _mismatch(got: Any, want: Any) -> str | None:
    gots = got if isinstance(got, tuple) else (got,)
    wants = want if isinstance(want, tuple) else (want,)
    for g, w in zip(gots, wants, strict=True):
        if g.shape != w.shape:
            return f"probe shape mismatch: original gives {tuple(g.shape)}, kernel math {tuple(w.shape)}"
        err = (g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12)
        if not torch.isfinite(err) or err > PROBE_RTOL.get(w.dtype, 3e-2):
            return f"original forward and the declared kernel math disagree (relative error {err:.2e})"
    return None


def _probe_tensor(*shape: int, like: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen, dtype=torch.float32)
    if like is not None:
        t = t.to(like.device)
    return t


def _is_meta(*tensors: torch.Tensor) -> bool:
    return any(t.is_meta for t in tensors)


# ---------------------------------------------------------------- rms_norm
def _rms_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float | int):
            return float(value)
    return None


def rms_norm_eps(module: nn.Module) -> float:
    """The epsilon of an RMSNorm module (checked to exist at plan time)."""
    eps = _rms_eps(module)
    assert eps is not None
    return eps


def _check_rms_norm(module: Any, options: BaseModel) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "module has no 1-D `weight`"
    if _rms_eps(module) is None:
        return "module has no `variance_epsilon`/`eps` attribute"
    return None


def _probe_rms_norm(module: Any, options: RMSNormOptions) -> str | None:
    weight = module.weight
    if _is_meta(weight):
        return None
    x = _probe_tensor(3, weight.shape[0], like=weight).to(weight.dtype)
    with torch.no_grad():
        got = module.forward(x)
        want = rms_norm_reference(x, weight, rms_norm_eps(module), options.weight_offset, options.casting)
    return _mismatch(got, want)


# ---------------------------------------------------------------- swiglu
_SILU_PROBE = torch.linspace(-6.0, 6.0, 25)


def is_silu(act: Any) -> bool:
    """Whether ``act`` computes SiLU (nn.SiLU, transformers' SiLUActivation, ...), checked numerically."""
    if not isinstance(act, nn.Module):
        return False
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(_SILU_PROBE), torch.nn.functional.silu(_SILU_PROBE), atol=1e-6))
    except Exception:
        return False


def _check_swiglu(module: Any, options: BaseModel) -> str | None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(module, name, None), nn.Linear):
            return f"module has no nn.Linear `{name}`"
    act = getattr(module, "act_fn", None)
    if not is_silu(act):
        return f"activation {type(act).__name__} is not SiLU: SwiGLU would change the math"
    return None


def _probe_swiglu(module: Any, options: BaseModel) -> str | None:
    weight = module.gate_proj.weight
    if _is_meta(weight):
        return None
    x = _probe_tensor(3, weight.shape[1], like=weight).to(weight.dtype)
    with torch.no_grad():
        got = module.forward(x)
        want = module.down_proj(swiglu_reference(module.gate_proj(x), module.up_proj(x)))
    return _mismatch(got, want)


# ---------------------------------------------------------------- rope (function)
def _check_rope_function(fn: Any, options: BaseModel) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "target is not a Python function with an inspectable signature"
    if params[:4] != ["q", "k", "cos", "sin"]:
        return f"signature starts with {params[:4]}, expected (q, k, cos, sin, ...)"
    return None


def _probe_rope(fn: Any, options: BaseModel) -> str | None:
    q, k = _probe_tensor(2, 4, 5, 8, seed=1), _probe_tensor(2, 2, 5, 8, seed=2)
    cos, sin = _probe_tensor(2, 5, 8, seed=3), _probe_tensor(2, 5, 8, seed=4)
    with torch.no_grad():
        return _mismatch(fn(q, k, cos, sin), rope_reference(q, k, cos, sin))


def _probe_vision_rope(fn: Any, options: BaseModel) -> str | None:
    q, k = _probe_tensor(5, 3, 8, seed=1), _probe_tensor(5, 3, 8, seed=2)
    cos, sin = _probe_tensor(5, 8, seed=3), _probe_tensor(5, 8, seed=4)
    with torch.no_grad():
        return _mismatch(fn(q, k, cos, sin), vision_rope_reference(q, k, cos, sin))


# ---------------------------------------------------------------- mrope (module)
def _check_mrope(module: Any, options: MRopeOptions) -> str | None:
    inv_freq = getattr(module, "inv_freq", None)
    section = getattr(module, "mrope_section", None)
    if not isinstance(inv_freq, torch.Tensor) or section is None:
        return "module has no `inv_freq` buffer and `mrope_section`"
    if getattr(module, "rope_type", "default") != "default":
        return f"rope_type {module.rope_type!r} updates inv_freq at run time; only 'default' is fused"
    try:
        mrope_axis_table(inv_freq.shape[0], list(section), options.layout)
    except ValueError as exc:
        return str(exc)
    return None


def _probe_mrope(module: Any, options: MRopeOptions) -> str | None:
    inv_freq = module.inv_freq
    if _is_meta(inv_freq):
        return None
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 64, (3, 2, 5), generator=gen).to(inv_freq.device)
    x = torch.zeros(1, device=inv_freq.device, dtype=torch.float32)
    table = mrope_axis_table(inv_freq.shape[0], list(module.mrope_section), options.layout)
    with torch.no_grad():
        got = module.forward(x, pos)
        want = mrope_cos_sin_reference(pos, inv_freq, table, module.attention_scaling, torch.float32)
    return _mismatch(got, want)


# ---------------------------------------------------------------- fused_moe (module)
def _check_moe(module: Any, options: BaseModel) -> str | None:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return "module has no 3-D `gate_up_proj`/`down_proj` parameters (transformers>=5 experts layout)"
    if gate_up.dim() != 3 or down.dim() != 3:
        return "expert weights are not 3-D [experts, out, in]"
    experts, two_i, hidden = gate_up.shape
    if down.shape != (experts, hidden, two_i // 2) or two_i % 2:
        return f"down_proj {tuple(down.shape)} does not match gate_up_proj {tuple(gate_up.shape)}"
    for flag, meaning in (
        ("has_bias", "biases"),
        ("is_transposed", "transposed [E, in, out] weights"),
        ("has_post_expert_norm", "a post-expert norm"),
    ):
        if getattr(module, flag, False):
            return f"experts with {meaning} are not fused"
    if getattr(module, "is_concatenated", True) is False or getattr(module, "has_gate", True) is False:
        return "experts without a concatenated gate/up projection are not fused"
    act = getattr(module, "act_fn", None)
    if not is_silu(act):
        return f"expert activation {type(act).__name__} is not SiLU"
    return None


def _probe_moe(module: Any, options: BaseModel) -> str | None:
    gate_up = module.gate_up_proj
    if _is_meta(gate_up):
        return None
    experts, _, hidden = gate_up.shape
    gen = torch.Generator().manual_seed(0)
    x = _probe_tensor(6, hidden, like=gate_up).to(gate_up.dtype)
    top_k = min(2, experts)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(6)]).to(gate_up.device)
    w = torch.rand(6, top_k, generator=gen).to(gate_up)
    with torch.no_grad():
        got = module.forward(x, idx, w)
        want = moe_experts_reference(x, idx, w, gate_up, module.down_proj)
    return _mismatch(got, want)


KERNEL_TYPES: dict[str, KernelType] = {
    kt.name: kt
    for kt in (
        KernelType(
            "rms_norm",
            "module",
            RMSNormOptions,
            _check_rms_norm,
            _probe_rms_norm,
            "RMSNorm forward (weight offset and casting declared by the spec)",
        ),
        KernelType(
            "swiglu",
            "module",
            NoOptions,
            _check_swiglu,
            _probe_swiglu,
            "gate/up/down MLP with silu(gate) * up",
        ),
        KernelType(
            "rope",
            "function",
            NoOptions,
            _check_rope_function,
            _probe_rope,
            "apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)",
        ),
        KernelType(
            "vision_rope",
            "function",
            NoOptions,
            _check_rope_function,
            _probe_vision_rope,
            "apply_rotary_pos_emb_vision(q, k, cos, sin) of the Qwen2-VL vision tower",
        ),
        KernelType(
            "mrope",
            "module",
            MRopeOptions,
            _check_mrope,
            _probe_mrope,
            "multimodal (t, h, w) rotary cos/sin of Qwen2-VL / Qwen3-VL text models",
        ),
        KernelType(
            "fused_moe",
            "module",
            NoOptions,
            _check_moe,
            _probe_moe,
            "transformers>=5 experts module (3-D gate_up_proj/down_proj, SiLU)",
        ),
    )
}


def get_kernel_type(name: str) -> KernelType:
    """Look up a kernel type, raising a clear error that lists the known ones."""
    from engine.errors import UnknownKernelError

    try:
        return KERNEL_TYPES[name]
    except KeyError:
        raise UnknownKernelError(f"unknown kernel {name!r}; known kernels: {', '.join(sorted(KERNEL_TYPES))}") from None
