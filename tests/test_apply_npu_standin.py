"""Model-level parity of the NPU kernels against the documented-contract torch_npu stand-in.

fp32: every parameter's gradient (experts and router included) within 1e-5 of transformers' own.
bf16: patched and unpatched bf16 runs against an fp32 reference; each parameter's gradient error may be at most
2x transformers' own bf16 error (loss: 2x plus 1e-4). MoE routing is pinned to the fp32 reference's top-k
choices there, so a near-tie flipping in one run and not the other does not dominate what is measured.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

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

MOE_OPS = {"npu_grouped_matmul", "npu_swiglu"}  # fp32 tokens route in plain torch (permute is bf16-only)
FUSED_ROUTING_OPS = {"npu_moe_token_permute", "npu_moe_token_unpermute"}
EXPECTED_OPS = {
    "llama": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "mistral": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen2": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen3": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen3_moe": {"npu_rms_norm", "npu_rotary_mul", *MOE_OPS},
    "qwen2_vl": {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"},
    "qwen3_vl_moe": {"npu_rms_norm", "npu_rotary_mul", *MOE_OPS},
}
BACKWARD_OPS = {"npu_rms_norm_backward", "npu_rotary_mul_backward", "npu_swiglu_backward"}


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
        assert BACKWARD_OPS & set(calls), "the ops' own backward kernels never ran"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-5)  # every parameter, one by one; a missing one fails
    assert_same_tensors(weights, snapshot(model))
    assert not patched_forward_names(model), "revert left instance forwards behind"
    after_loss, _ = loss_and_grads(model, batch)
    assert torch.equal(after_loss, ref_loss)


def test_apply_available_kernels_skips_manual_entries_and_reports_why(npu_standin):
    model = tiny_models.build("qwen3_moe")
    assert engine.apply_available_kernels(model, device="npu", verbose=False) is model
    report = engine.kernel_report(model)
    patched = {p.entry for p in report.patched}
    assert patched == {"rms_norm", "swiglu", "rope", "rope_table", "sdpa_is_causal", "linear_cross_entropy"}
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
        "rope_table",
        "fused_moe",
        "sdpa_is_causal",
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
    angles = torch.randn(7, 16) * 3
    cos, sin = angles.cos(), angles.sin()  # npu_rotary_mul documents r1/r2 within [-1, 1]
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
    from engine.kernels.portable.rope_table import NpuRopeTableKernel
    from engine.kernels.portable.sdpa_is_causal import NpuSdpaIsCausalKernel

    assert set(found) == {
        engine.NpuRMSNormKernel,
        engine.NpuSwiGluKernel,
        engine.NpuRoPEKernel,
        NpuRopeTableKernel,
        NpuSdpaIsCausalKernel,
        NpuLinearCrossEntropyKernel,
    }
    assert all(hasattr(k, "type") and hasattr(k, "device") for k in found)


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def _routing_choices(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, i, out: seen.append(out[2])) for r in _routers(model)]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return seen


@contextmanager
def pinned_routing(model: torch.nn.Module, choices: list[torch.Tensor]) -> Iterator[None]:
    """Each router keeps its own logits and weights but takes the given top-k experts."""
    routers = _routers(model)
    assert len(routers) == len(choices) > 0
    for router, idx in zip(routers, choices, strict=True):

        def forward(hidden_states, router=router, idx=idx):
            logits = F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
            top = F.softmax(logits, dtype=torch.float, dim=-1).gather(1, idx)
            if getattr(router, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        router.forward = forward
    try:
        yield
    finally:
        for router in routers:
            del router.forward


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_vl_moe"])
def test_moe_models_bf16_no_worse_than_twice_transformers(family, npu_standin):
    reference = tiny_models.build(family)
    batch = tiny_models.sample_batch(reference)
    choices = _routing_choices(reference, batch)
    with pinned_routing(reference, choices):
        ref_loss, ref_grads = loss_and_grads(reference, batch)
    model = tiny_models.build(family, dtype=torch.bfloat16)
    with pinned_routing(model, choices):
        own_loss, own_grads = loss_and_grads(model, batch)
        with engine.apply(model, spec=family, device="npu", verbose=False) as handle:
            assert "fused_moe" in {p.entry for p in handle.report.patched}
            calls.clear()
            loss, grads = loss_and_grads(model, batch)
            assert set(calls) >= FUSED_ROUTING_OPS | MOE_OPS
    assert _rel(loss, ref_loss) <= 2 * _rel(own_loss, ref_loss) + 1e-4
    assert grads.keys() == own_grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        own, got = _rel(own_grads[name], ref), _rel(grads[name], ref)
        assert got <= 2 * own, f"{name}: bf16 gradient error {got:.3e} > 2x transformers' own {own:.3e}"
