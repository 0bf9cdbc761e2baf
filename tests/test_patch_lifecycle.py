"""Patch lifecycle: deepcopy, garbage collection, call signatures, and plan-time failures that must be skips."""

from __future__ import annotations

import copy
import gc
import importlib.util
import weakref

import pytest
import torch
from torch import nn

import engine
from engine import patching
from engine.patching import patched_call_of, patched_kernel_of
from engine.spec import KernelSpec
from engine.testing import tiny_models


def _spec(*entries: dict, model_type: str = "llama") -> KernelSpec:
    return KernelSpec.model_validate({"name": "custom", "model_types": [model_type], "entries": list(entries)})


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def test_deepcopy_carries_patches_and_its_own_handle(npu_standin):
    from transformers.models.llama import modeling_llama

    model = tiny_models.build("llama")
    batch = tiny_models.sample_batch(model)
    engine.apply(model, spec="llama", verbose=False)
    twin = copy.deepcopy(model)

    call = patched_call_of(twin.model.norm)
    assert call is not None and call.target is twin.model.norm  # bound to the copy, not the original
    assert engine.kernel_report(twin).patched and engine.handles(twin)
    from engine.testing.torch_npu_standin import calls

    calls.clear()
    torch.testing.assert_close(_loss(twin, batch), _loss(model, batch))
    assert calls["npu_rms_norm"] > 0

    engine.revert(model)  # the copy keeps its own share of the process-wide RoPE patch
    assert patched_kernel_of(modeling_llama.apply_rotary_pos_emb) is engine.NpuRoPEKernel
    assert patched_call_of(model.model.norm) is None and patched_call_of(twin.model.norm) is not None
    engine.revert(twin)
    assert patched_kernel_of(modeling_llama.apply_rotary_pos_emb) is None
    assert patched_call_of(twin.model.norm) is None


def test_engine_keeps_no_model_alive_and_collection_releases_function_patches(npu_standin):
    from transformers.models.llama import modeling_llama

    model = tiny_models.build("llama")
    handle = engine.apply(model, spec="llama", verbose=False)
    assert patched_kernel_of(modeling_llama.apply_rotary_pos_emb) is engine.NpuRoPEKernel
    alive = weakref.ref(model)
    del model, handle
    gc.collect()
    assert alive() is None, "a reference from the engine kept the model alive"
    assert patched_kernel_of(modeling_llama.apply_rotary_pos_emb) is None
    assert not patching.FUNCTION_PATCHES


def test_module_that_is_the_target_itself_is_collected(npu_standin):
    model = nn.Sequential(tiny_models.build("llama").model.norm)
    spec = _spec({"name": "n", "kernel": "rms_norm", "target": {"module_class": "LlamaRMSNorm"}})
    engine.apply(model[0], spec, verbose=False)  # the patched module holds the handle itself
    alive = weakref.ref(model[0])
    del model
    gc.collect()
    assert alive() is None


def test_patched_forward_accepts_keywords_and_positionals(npu_standin):
    from engine.testing.torch_npu_standin import calls

    model = tiny_models.build("llama")
    norm, mlp = model.model.norm, model.model.layers[0].mlp
    x = torch.randn(2, 3, 64)
    want_norm, want_mlp = norm(x), mlp(x)
    with engine.apply(model, spec="llama", verbose=False):
        calls.clear()
        torch.testing.assert_close(norm(hidden_states=x), want_norm)
        torch.testing.assert_close(norm(x), want_norm)
        torch.testing.assert_close(mlp(x=x), want_mlp)
        assert calls["npu_rms_norm"] == 2 and calls["npu_swiglu"] == 1
        with pytest.raises(TypeError):  # a wrong call still fails the way the original fails
            norm(x, hidden_states=x)


def test_function_patch_takes_keywords(npu_standin):
    from transformers.models.llama import modeling_llama

    from engine.testing.torch_npu_standin import calls

    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    angles = torch.rand(1, 5, 8) * 6.28
    cos, sin = angles.cos(), angles.sin()
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    with engine.apply(tiny_models.build("llama"), spec="llama", verbose=False):
        calls.clear()
        got = modeling_llama.apply_rotary_pos_emb(q=q, k=k, cos=cos, sin=sin, unsqueeze_dim=1)
        assert calls["npu_rotary_mul"] == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


class TwoInputNorm(nn.Module):
    """A gated norm: its forward takes two inputs, so an rms_norm probe calling forward(x) raises."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.eps = 1e-6

    def forward(self, x, gate):
        return x * gate * self.weight


def test_exception_in_a_probe_skips_that_entry_with_a_reason(npu_standin):
    model = nn.Sequential(TwoInputNorm(), tiny_models.build("llama").model.norm)
    spec = _spec(
        {"name": "gated", "kernel": "rms_norm", "target": {"module_class": "TwoInputNorm"}},
        {"name": "plain", "kernel": "rms_norm", "target": {"module_class": "LlamaRMSNorm"}},
    )
    with engine.apply(model, spec, verbose=False) as handle:
        assert [p.entry for p in handle.report.patched] == ["plain"]
        (skip,) = handle.report.skipped
        assert (skip.spec, skip.entry) == ("custom", "gated")
        assert "target check failed: TypeError" in skip.reason


def test_function_the_model_never_calls_is_skipped_not_reported_patched(npu_standin):
    from transformers.models.mistral import modeling_mistral

    model = tiny_models.build("llama")
    spec = _spec(
        {
            "name": "rope",
            "kernel": "rope",
            "target": {"function": "transformers.models.mistral.modeling_mistral.apply_rotary_pos_emb"},
        }
    )
    report = engine.plan(model, spec, device="npu")
    assert not report.patches
    assert "never calls apply_rotary_pos_emb" in report.skipped[0].reason
    assert patched_kernel_of(modeling_mistral.apply_rotary_pos_emb) is None


def test_standin_is_a_findable_module(npu_standin):
    assert importlib.util.find_spec("torch_npu") is not None


def test_kernel_report_merges_handles_in_order(npu_standin):
    model = tiny_models.build("qwen3_moe")
    engine.apply_kernel(model, engine.NpuRMSNormKernel, verbose=False)
    engine.apply(model, spec="qwen3_moe", verbose=False)
    report = engine.kernel_report(model)
    entries = ["rms_norm", "swiglu", "rope", "rope_table", "fused_moe", "sdpa_is_causal", "linear_cross_entropy"]
    assert [p.entry for p in report.patched] == entries
    assert report.device == "npu" and report.specs == ["qwen3_moe"]
    assert any("already patched" in s.reason for s in report.skipped)
    engine.revert(model)
    assert not engine.kernel_report(model).patched
