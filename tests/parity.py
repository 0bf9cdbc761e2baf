"""Assertions on forward+backward parity (the measurements themselves live in ``engine.testing.parity``)."""

from __future__ import annotations

import torch
from torch import nn

from engine.testing.parity import loss_and_grads, rel_error, snapshot

__all__ = ["assert_close_grads", "assert_same_tensors", "loss_and_grads", "patched_forward_names", "snapshot"]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} changed"


def assert_close_grads(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rtol: float) -> None:
    assert ref.keys() == got.keys(), set(ref) ^ set(got)
    for name, want in ref.items():
        err = rel_error(got[name], want)
        assert err <= rtol, f"grad of {name}: relative error {err:.3e} > {rtol}"


def patched_forward_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if "forward" in m.__dict__}
