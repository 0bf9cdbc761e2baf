"""Forward+backward parity between an original and a patched model."""

from __future__ import annotations

import torch
from torch import nn


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    # the loss alone: with linear_cross_entropy patched, a training call with labels returns no logits
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} changed"


def assert_close_grads(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rtol: float) -> None:
    assert ref.keys() == got.keys(), set(ref) ^ set(got)
    for name, r in ref.items():
        g = got[name]
        err = (g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)
        assert err <= rtol, f"grad of {name}: relative error {err:.3e} > {rtol}"


def patched_forward_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if "forward" in m.__dict__}
