"""``engine verify``: every parameter's gradient is checked, so a kernel that drops gradients fails."""

import pytest
import torch

from engine.cli import main
from engine.kernels.npu import fused_moe, grouped_matmul
from engine.testing.torch_npu_standin import torch_npu_standin
from engine.verify import check_grads, verify_family

EXPERT_WEIGHTS = {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}


def _gmm_without_backward(x, weight, counts):
    """The kernel as it was before issue 11: the op called directly, relying on its (absent) autograd."""
    return grouped_matmul._gmm(x, weight.transpose(1, 2), counts, grouped_matmul.GROUP_ON_M)


def test_verify_checks_every_parameter(monkeypatch):
    monkeypatch.setenv("ENGINE_DEVICE", "npu")
    with torch_npu_standin():
        result = verify_family("qwen3_moe", "npu")
    assert result.ok, result.summary()
    assert "fused_moe->NpuFusedMoEKernel" in result.patched
    model_params = 25  # every parameter of the tiny qwen3_moe gets a gradient
    assert len(result.grads.errors) == model_params and set(result.grads.errors) >= EXPERT_WEIGHTS
    assert not result.grads.missing and max(result.grads.errors.values()) <= 1e-5


def test_verify_fails_when_the_moe_backward_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(fused_moe, "grouped_linear", _gmm_without_backward)
    monkeypatch.setenv("ENGINE_DEVICE", "npu")
    with torch_npu_standin(), pytest.warns(UserWarning, match="autograd kernel was not registered"):
        result = verify_family("qwen3_moe", "npu")
    assert not result.ok
    assert set(result.grads.missing) >= EXPERT_WEIGHTS
    assert "NO GRADIENT with the patch" in result.summary()
    with pytest.warns(UserWarning):
        assert main(["verify", "qwen3_moe", "--device", "npu", "--standin"]) == 1
    assert capsys.readouterr().out.startswith("FAIL qwen3_moe on npu")


def test_verify_fails_on_a_wrong_expert_gradient(monkeypatch):
    backward = grouped_matmul.GroupedLinear.backward

    def halved_weight_grad(ctx, dy):
        dx, dw, none = backward(ctx, dy)
        return dx, dw * 0.5, none

    monkeypatch.setattr(grouped_matmul.GroupedLinear, "backward", staticmethod(halved_weight_grad))
    monkeypatch.setenv("ENGINE_DEVICE", "npu")
    with torch_npu_standin():
        result = verify_family("qwen3_moe", "npu")
    assert not result.ok and set(result.grads.over_tolerance) >= EXPERT_WEIGHTS


def test_check_grads_sorts_parameters():
    g = torch.ones(3)
    check = check_grads(
        ["a", "b", "c", "d", "e"],
        unpatched={"a": g, "b": g, "e": g},
        patched={"a": g, "c": g, "e": g * 2},
        reference={"a": g, "b": g, "c": g, "e": g},
        tolerance=1e-4,
    )
    assert check.missing == ["b"] and check.unexpected == ["c"] and check.unexercised == ["d"]
    assert check.over_tolerance == ["e"] and not check.ok
