"""Forward+backward parity check of a spec on a tiny random-init model (used by ``engine verify``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.api import apply
from engine.device import detect_device, validate_device
from engine.testing.tiny_models import build, sample_batch

FP32_TOLERANCE = 1e-4
# In half precision the patched model is compared with an fp32 copy and must be no worse than transformers'
# own half-precision run (times this factor, plus a small floor).
HALF_FACTOR, HALF_FLOOR = 1.5, 1e-3


@dataclass
class VerifyResult:
    model: str
    device: str
    loss_error: float
    grad_error: float
    worst_grad: tuple[str, float]
    weights_unchanged: bool
    reverted: bool
    patched: list[str] = field(default_factory=list)
    loss_tolerance: float = FP32_TOLERANCE
    grad_tolerance: float = FP32_TOLERANCE

    @property
    def ok(self) -> bool:
        return (
            self.loss_error <= self.loss_tolerance
            and self.grad_error <= self.grad_tolerance
            and self.weights_unchanged
            and self.reverted
            and bool(self.patched)
        )

    def summary(self) -> str:
        return (
            f"{'PASS' if self.ok else 'FAIL'} {self.model} on {self.device}: patched {', '.join(self.patched)}; "
            f"loss rel err {self.loss_error:.2e} (tol {self.loss_tolerance:.2e}), all-grads rel err "
            f"{self.grad_error:.2e} (tol {self.grad_tolerance:.2e}; worst parameter {self.worst_grad[0]} "
            f"{self.worst_grad[1]:.2e}); "
            f"weights unchanged={self.weights_unchanged}; reverted={self.reverted}"
        )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _global_rel(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Relative error of all gradients taken together (one norm over every parameter)."""
    num = sum(float((grads[n].double() - r.double()).norm() ** 2) for n, r in ref.items())
    den = sum(float(r.double().norm() ** 2) for r in ref.values())
    return (num / max(den, 1e-300)) ** 0.5


def _run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


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
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    orig_loss, orig_grads = _run(model, batch)
    handle = apply(model, spec or name, device, verbose=False)
    loss, grads = _run(model, batch)
    handle.revert()
    after, _ = _run(model, batch)
    loss_tol = grad_tol = FP32_TOLERANCE
    ref_loss, ref_grads = orig_loss, orig_grads
    if dtype != torch.float32:
        ref_loss, ref_grads = _run(build(name, dtype=torch.float32).to(placement), batch)
        loss_tol = HALF_FACTOR * _rel(orig_loss, ref_loss) + HALF_FLOOR
        grad_tol = HALF_FACTOR * _global_rel(orig_grads, ref_grads) + HALF_FLOOR
    worst = max(((n, _rel(grads[n], g)) for n, g in ref_grads.items()), key=lambda item: item[1])
    grad_error = _global_rel(grads, ref_grads)
    return VerifyResult(
        model=name,
        device=device,
        loss_error=_rel(loss, ref_loss),
        grad_error=grad_error,
        worst_grad=worst,
        weights_unchanged=all(torch.equal(t, model.state_dict()[n]) for n, t in weights.items()),
        reverted=torch.equal(after, orig_loss),
        patched=[f"{p.entry}->{p.kernel}" for p in handle.report.patched],
        loss_tolerance=loss_tol,
        grad_tolerance=grad_tol,
    )
