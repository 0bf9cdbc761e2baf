"""Model-level parity of the Triton kernels (interpreter on CPU, real GPU when present)."""

import pytest
import torch

import engine
from engine.testing import tiny_models
from tests.parity import (
    assert_close_grads,
    assert_same_tensors,
    loss_and_grads,
    patched_forward_names,
    snapshot,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_vl", "qwen3_vl_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_spec_fwd_bwd_parity_and_revert(family):
    model = tiny_models.build(family).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in tiny_models.sample_batch(model).items()}
    weights = snapshot(model)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    with engine.apply(model, spec=family, device="cuda", verbose=False) as handle:
        kernels = {p.kernel for p in handle.report.patched}
        assert {"TritonRMSNormKernel", "TritonRoPEKernel"} <= kernels, handle.report.summary()
        loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-4)
    assert_same_tensors(weights, snapshot(model))
    assert not patched_forward_names(model)


def test_qwen3_q_norm_and_k_norm_are_patched():
    model = tiny_models.build("qwen3")
    with engine.apply(model, spec="qwen3", device="cuda", verbose=False) as handle:
        norm = next(p for p in handle.report.patched if p.entry == "rms_norm")
        assert "model.layers.0.self_attn.q_norm" in norm.modules
        assert "model.layers.0.self_attn.k_norm" in norm.modules
