"""Forward+backward parity check of a spec on a tiny random-init model (used by ``engine verify``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.api import apply
from engine.device import detect_device, validate_device
from engine.testing.parity import loss_and_grads, rel_error, snapshot
from engine.testing.tiny_models import build, sample_batch

FP32_TOLERANCE = 1e-4  # loss, all gradients together, and each parameter's gradient on its own
# In half precision the patched model is compared with an fp32 copy and must be no worse than transformers'
# own half-precision run (times this factor, plus a small floor). Each parameter must still get a gradient,
# but per-parameter errors are not bounded there: in half precision MoE top-k choices near ties flip between
# any two runs, which moves single router/expert gradients far more than any kernel's rounding does.
HALF_FACTOR, HALF_FLOOR = 1.5, 1e-3


@dataclass
class GradCheck:
    """Every trainable parameter's gradient with the patch, against the reference run.

    A kernel whose backward is missing or detached (an op without autograd) leaves parameters without a
    gradient, or with a wrong one, while the loss still matches: each parameter is therefore checked on its
    own, and one that had a gradient without the patch but has none with it fails the check.
    """

    errors: dict[str, float] = field(default_factory=dict)  # relative error per parameter
    tolerances: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # a gradient without the patch, none with it
    unexpected: list[str] = field(default_factory=list)  # a gradient only with the patch
    unexercised: list[str] = field(default_factory=list)  # no gradient either way (e.g. vision on a text batch)

    @property
    def over_tolerance(self) -> list[str]:
        return [n for n, err in self.errors.items() if not err <= self.tolerances[n]]

    @property
    def ok(self) -> bool:
        return bool(self.errors) and not (self.missing or self.unexpected or self.over_tolerance)

    @property
    def worst(self) -> tuple[str, float]:
        if not self.errors:
            return "-", float("nan")
        name = max(self.errors, key=lambda n: self.errors[n])
        return name, self.errors[name]

    def summary(self) -> str:
        name, err = self.worst
        tol = self.tolerances.get(name, math.nan)
        bound = f"tol {tol:.2e}" if math.isfinite(tol) else "presence checked, size not bounded in half precision"
        text = (
            f"gradients of {len(self.errors)} parameters checked one by one (worst {name} rel err {err:.2e}, {bound})"
        )
        for label, names in (
            ("over tolerance", self.over_tolerance),
            ("NO GRADIENT with the patch", self.missing),
            ("gradient only with the patch", self.unexpected),
            ("no gradient in either run", self.unexercised),
        ):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                text += f"; {label}: {shown}"
        return text


def check_grads(
    trainable: list[str],
    unpatched: dict[str, torch.Tensor],
    patched: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    tolerance: dict[str, float] | float,
) -> GradCheck:
    """Compare ``patched`` with ``reference`` per parameter; which ones have gradients is judged against the
    ``unpatched`` run of the same model (same dtype)."""
    check = GradCheck()
    for name in trainable:
        has_before, has_after = name in unpatched, name in patched
        if has_before and not has_after:
            check.missing.append(name)
        elif has_after and not has_before:
            check.unexpected.append(name)
        elif not has_before:
            check.unexercised.append(name)
        else:
            check.errors[name] = rel_error(patched[name], reference[name])
            check.tolerances[name] = tolerance[name] if isinstance(tolerance, dict) else tolerance
    return check


@dataclass
class VerifyResult:
    model: str
    device: str
    loss_error: float
    grad_error: float
    grads: GradCheck
    weights_unchanged: bool
    reverted: bool
    patched: list[str] = field(default_factory=list)
    loss_tolerance: float = FP32_TOLERANCE
    grad_tolerance: float = FP32_TOLERANCE

    @property
    def worst_grad(self) -> tuple[str, float]:
        return self.grads.worst

    @property
    def ok(self) -> bool:
        return (
            self.loss_error <= self.loss_tolerance
            and self.grad_error <= self.grad_tolerance
            and self.grads.ok
            and self.weights_unchanged
            and self.reverted
            and bool(self.patched)
        )

    def summary(self) -> str:
        return (
            f"{'PASS' if self.ok else 'FAIL'} {self.model} on {self.device}: patched {', '.join(self.patched)}; "
            f"loss rel err {self.loss_error:.2e} (tol {self.loss_tolerance:.2e}), all-grads rel err "
            f"{self.grad_error:.2e} (tol {self.grad_tolerance:.2e}); {self.grads.summary()}; "
            f"weights unchanged={self.weights_unchanged}; reverted={self.reverted}"
        )


def _global_rel(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Relative error of all gradients taken together (one norm over every parameter; a missing one counts
    as zero)."""
    num = sum(float((grads[n].double() - r.double()).norm() ** 2) if n in grads else 0.0 for n, r in ref.items())
    num += sum(float(r.double().norm() ** 2) for n, r in ref.items() if n not in grads)
    den = sum(float(r.double().norm() ** 2) for r in ref.values())
    return (num / max(den, 1e-300)) ** 0.5


def _placement(device: str) -> str:
    """Where the tiny model lives: the device itself, or the CPU for the Triton interpreter / NPU stand-in."""
    backend = getattr(torch, device, None)
    available = getattr(backend, "is_available", None)
    return device if device != "cpu" and available is not None and available() else "cpu"


def verify_family(
    name: str, device: str | None = None, spec: str | None = None, dtype: torch.dtype = torch.float32
) -> VerifyResult:
    device = validate_device(device) if device else detect_device()
    placement = _placement(device)
    model = build(name, dtype=dtype).to(placement)
    batch = {k: v.to(placement) for k, v in sample_batch(model).items()}
    weights = snapshot(model)
    orig_loss, orig_grads = loss_and_grads(model, batch)
    handle = apply(model, spec or name, device, verbose=False)
    loss, grads = loss_and_grads(model, batch)
    handle.revert()
    after, _ = loss_and_grads(model, batch)
    loss_tol = grad_tol = FP32_TOLERANCE
    per_param = FP32_TOLERANCE
    ref_loss, ref_grads = orig_loss, orig_grads
    if dtype != torch.float32:
        ref_loss, ref_grads = loss_and_grads(build(name, dtype=torch.float32).to(placement), batch)
        loss_tol = HALF_FACTOR * rel_error(orig_loss, ref_loss) + HALF_FLOOR
        grad_tol = HALF_FACTOR * _global_rel(orig_grads, ref_grads) + HALF_FLOOR
        per_param = math.inf  # presence only (see HALF_FACTOR)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return VerifyResult(
        model=name,
        device=device,
        loss_error=rel_error(loss, ref_loss),
        grad_error=_global_rel(grads, ref_grads),
        grads=check_grads(trainable, orig_grads, grads, ref_grads, per_param),
        weights_unchanged=all(torch.equal(t, model.state_dict()[n]) for n, t in weights.items()),
        reverted=torch.equal(after, orig_loss),
        patched=[f"{p.entry}->{p.kernel}" for p in handle.report.patched],
        loss_tolerance=loss_tol,
        grad_tolerance=grad_tol,
    )
