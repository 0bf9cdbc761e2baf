"""Forward+backward parity between an original and a patched model: shared by ``engine verify`` and the tests."""

from __future__ import annotations

import torch
from torch import nn


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one training call and every parameter's gradient (the loss alone: a call with labels
    through the fused linear cross-entropy returns no logits)."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state dict, to show later that no weight changed."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
