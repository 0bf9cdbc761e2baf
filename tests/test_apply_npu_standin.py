"""Model-level parity of the NPU kernels against the documented-semantics torch_npu stand-in."""

import pytest
import torch

import engine
from engine.testing import tiny_models
from engine.testing.torch_npu_standin import calls
from tests.parity import (
    assert_close_grads,
    assert_same_tensors,
    loss_and_grads,
    patched_forward_names,
    snapshot,
)

EXPECTED_OPS = {
    "llama": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "mistral": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen2": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen3": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen3_moe": {
        "npu_rms_norm",
        "npu_swiglu",
        "npu_rotary_mul",
        "npu_grouped_matmul",
        "npu_moe_token_permute",
        "npu_moe_token_unpermute",
    },
    "qwen2_vl": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen3_vl_moe": {
        "npu_rms_norm",
        "npu_rotary_mul",
        "npu_grouped_matmul",
        "npu_moe_token_permute",
        "npu_moe_token_unpermute",
        "npu_swiglu",
    },
}


@pytest.mark.parametrize("family", sorted(EXPECTED_OPS))
def test_spec_patch_matches_original_forward_and_backward(family, npu_standin):
    model = tiny_models.build(family)
    batch = tiny_models.sample_batch(model)
    weights = snapshot(model)
    ref_loss, ref_grads = loss_and_grads(model, batch)

    with engine.apply(model, spec=family, device="npu", verbose=False) as handle:
        assert handle.report.patched, handle.report.summary()
        assert patched_forward_names(model)
        calls.clear()
        loss, grads = loss_and_grads(model, batch)
        assert EXPECTED_OPS[family] <= set(calls), f"ops not called: {EXPECTED_OPS[family] - set(calls)}"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-4)
    assert_same_tensors(weights, snapshot(model))
    assert not patched_forward_names(model), "revert left instance forwards behind"
    after_loss, _ = loss_and_grads(model, batch)
    assert torch.equal(after_loss, ref_loss)


def test_apply_available_kernels_skips_manual_entries_and_reports_why(npu_standin):
    model = tiny_models.build("qwen3_moe")
    assert engine.apply_available_kernels(model, device="npu", verbose=False) is model
    report = engine.kernel_report(model)
    patched = {p.entry for p in report.patched}
    assert patched == {"rms_norm", "swiglu", "rope", "linear_cross_entropy"}
    reasons = {s.entry: s.reason for s in report.skipped}
    assert "manual" in reasons["fused_moe"] and "spec='qwen3_moe'" in reasons["fused_moe"]
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__
    engine.revert(model)
    assert not patched_forward_names(model)


def test_explicit_spec_applies_manual_moe_entry(npu_standin):
    model = tiny_models.build("qwen3_moe")
    handle = engine.apply(model, spec="qwen3_moe", device="npu", verbose=False)
    assert {p.entry for p in handle.report.patched} == {
        "rms_norm",
        "swiglu",
        "rope",
        "fused_moe",
        "linear_cross_entropy",
    }
    moe = next(p for p in handle.report.patched if p.entry == "fused_moe")
    assert moe.kernel == "NpuFusedMoEKernel" and moe.count == 1  # layer 1 is a dense mlp_only layer
    handle.revert()


def test_qwen2_vl_vision_rope_is_manual_and_matches(npu_standin):
    model = tiny_models.build("qwen2_vl")
    auto = engine.plan(model, device="npu")
    assert any(s.entry == "vision_rope" and "manual" in s.reason for s in auto.skipped)
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mod

    q, k = torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    cos, sin = torch.randn(7, 16), torch.randn(7, 16)
    want = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    with engine.apply(model, spec="qwen2_vl", device="npu", verbose=False) as handle:
        assert any(p.kernel == "NpuQwen2VLRoPEKernel" for p in handle.report.patched)
        calls.clear()
        got = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
        assert calls["npu_rotary_mul"] == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_apply_kernel_patches_one_kernel_type(npu_standin):
    model = tiny_models.build("qwen3")
    assert engine.apply_kernel(model, engine.NpuRMSNormKernel, verbose=False) is model
    report = engine.kernel_report(model)
    assert [p.kernel for p in report.patched] == ["NpuRMSNormKernel"]
    assert report.patched[0].count == 2 * 4 + 1  # 2 layers x (in, post, q_norm, k_norm) + final norm
    engine.revert(model)


def test_discover_kernels_lists_available_kernel_classes(npu_standin):
    model = tiny_models.build("qwen3_moe")
    found = engine.discover_kernels(model, device="npu")
    from engine.kernels.npu.linear_cross_entropy import NpuLinearCrossEntropyKernel

    assert set(found) == {
        engine.NpuRMSNormKernel,
        engine.NpuSwiGluKernel,
        engine.NpuRoPEKernel,
        NpuLinearCrossEntropyKernel,
    }
    assert all(hasattr(k, "type") and hasattr(k, "device") for k in found)


def test_npu_moe_bf16_matches_transformers(npu_standin):
    model = tiny_models.build("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(10, 64, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(10)])
    w = torch.rand(10, 2, requires_grad=True)
    ref = experts(x, idx, w)
    ref.pow(2).sum().backward()
    ref_grads = (
        x.grad.clone(),
        w.grad.clone(),
        experts.gate_up_proj.grad.clone(),
        experts.down_proj.grad.clone(),
    )
    x.grad = w.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False):
        out = experts(x, idx, w)
        out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip((x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
