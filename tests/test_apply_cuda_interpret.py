"""Model-level parity of the Triton kernels (interpreter on CPU, real GPU when present): every entry of each
family's spec is patched, and every one of its Triton kernels actually launches."""

from collections import Counter

import pytest
import torch

import engine
from engine.catalog import find_spec
from engine.kernels.triton.ops import library
from engine.testing import tiny_models
from tests.parity import (
    assert_close_grads,
    assert_same_tensors,
    loss_and_grads,
    patched_forward_names,
    snapshot,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton kernels each kernel kind launches in one training step (forward and backward).
KERNELS = {
    "rms_norm": {"_rms_norm_fwd", "_rms_norm_bwd"},
    "swiglu": {"_swiglu_fwd", "_swiglu_bwd"},
    "rope": {"_rope_kernel"},
    "mrope": {"_mrope_cos_sin"},
    "fused_moe": {"_row_gemm", "_expert_wgrad", "_gather_sum_kernel"},
    "linear_cross_entropy": {"_chunk_loss_kernel"},
    "embedding": {"_embedding_grad_rows", "_embedding_grad_heavy"},
    "sdpa_is_causal": set(),  # a decision in Python, no launch (its effect is under compile: test_sdpa_is_causal)
    "rope_table": set(),  # plain PyTorch, and only under compile (test_rope_table)
}
EXERCISED = {  # kinds a text-only batch does not reach: the Qwen2-VL vision tower's RoPE
    family: {e.kernel for e in find_spec(family).entries} - {"vision_rope"} for family in tiny_models.TINY_MODELS
}


def _name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


@pytest.fixture()
def launches(monkeypatch):
    """Names of the Triton kernels launched while the test runs."""
    seen: Counter[str] = Counter()
    real = library.launch

    def counting(kernel, grid, *args, **meta):
        seen[_name(kernel)] += 1
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(library, "launch", counting)
    return seen


@pytest.mark.parametrize("family", sorted(tiny_models.TINY_MODELS))
def test_triton_spec_fwd_bwd_parity_and_revert(family, launches):
    model = tiny_models.build(family).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in tiny_models.sample_batch(model).items()}
    weights = snapshot(model)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    with engine.apply(model, spec=family, device="cuda", verbose=False) as handle:
        assert not handle.report.skipped, handle.report.summary()
        assert {p.entry for p in handle.report.patched} == {e.name for e in find_spec(family).entries}
        assert {p.kernel for p in handle.report.patched} <= {k.__name__ for k in engine.REGISTRY.all()}
        launches.clear()
        loss, grads = loss_and_grads(model, batch)
    expected = set().union(*(KERNELS[kind] for kind in EXERCISED[family]))
    assert expected <= set(launches), f"never launched: {expected - set(launches)}"
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
