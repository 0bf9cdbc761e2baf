"""``sdpa_is_causal``: a compiled call without a padding mask runs SDPA with ``is_causal=True`` instead of a
materialised mask; padded calls, sliding windows, ``torch.export`` and eager calls keep transformers' answer."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers.masking_utils as masking

import engine
from engine.kernels.kinds import get_kind
from engine.kernels.kinds.sdpa_is_causal import PARAMS, reference
from engine.testing import tiny_models
from tests.parity import assert_close_grads, loss_and_grads

KIND = get_kind("sdpa_is_causal")
ORIGINAL = masking._ignore_causal_mask_sdpa


@functools.wraps(ORIGINAL)
def old_rule(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    """transformers 5.x on torch < 2.14: never skips while Dynamo traces. Installed for every test, so the tests
    show the kernel's effect whatever transformers and torch CI installs (newer pairs skip on their own)."""
    return False if torch.compiler.is_compiling() else ORIGINAL(*args, **kwargs)


@pytest.fixture(autouse=True)
def old_transformers(monkeypatch):
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", old_rule)


@pytest.fixture
def patched():
    """A tiny model (SDPA attention) with the entry applied (process-wide), reverted afterwards."""
    model = tiny_models.build("qwen3")
    handle = engine.apply(model, spec="qwen3", device="cpu")
    assert [p.entry for p in handle.report.patched if p.entry == "sdpa_is_causal"] == ["sdpa_is_causal"]
    yield model
    handle.revert()
    assert masking._ignore_causal_mask_sdpa is old_rule


class AttentionCalls:
    """A compile backend recording, per SDPA call in the graph, (has a mask, is_causal)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN204
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                self.calls.append((mask is not None, bool(node.kwargs.get("is_causal", False))))
        return gm


def compiled_loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    torch._dynamo.reset()
    calls = AttentionCalls()
    compiled = torch.compile(model, backend=calls, fullgraph=True)
    model.zero_grad(set_to_none=True)
    loss = compiled(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls.calls


def test_transformers_rule_passes_the_check_and_probe():
    assert KIND.check(ORIGINAL, None) is None
    assert KIND.probe(ORIGINAL, None) is None


def test_a_function_with_another_rule_is_refused():
    def ignores_windows(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        return padding_mask is None and (q_length == 1 or q_length == kv_length or q_offset == 0)

    def skips_padded(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        return reference(q_length, kv_length, q_offset, local_attention_size)

    def other_signature(padding_mask, query_length, kv_length, kv_offset, local_attention_size=None):
        return False

    assert "window=5" in KIND.probe(ignores_windows, None)
    assert "padded batch" in KIND.probe(skips_padded, None)
    assert "expected (padding_mask" in KIND.check(other_signature, None)


def test_unpatched_compiled_model_builds_a_mask():
    """The baseline the kernel changes (with the old rule installed, on any transformers)."""
    model = tiny_models.build("qwen3")
    _, _, calls = compiled_loss_and_grads(model, tiny_models.sample_batch(model, seq=16))
    assert calls == [(True, False)] * model.config.num_hidden_layers


def test_compiled_model_runs_causal_sdpa_without_a_mask_and_matches_eager(patched):
    batch = tiny_models.sample_batch(patched, seq=16)
    want_loss, want_grads = loss_and_grads(patched, batch)
    loss, grads, calls = compiled_loss_and_grads(patched, batch)
    assert calls == [(False, True)] * patched.config.num_hidden_layers
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert_close_grads(want_grads, grads, rtol=1e-5)


def test_a_padded_batch_keeps_its_mask_under_compile(patched):
    batch = tiny_models.sample_batch(patched, seq=16)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :5] = 0  # left padding in the first row
    batch = {**batch, "attention_mask": mask}
    want_loss, want_grads = loss_and_grads(patched, batch)
    loss, grads, calls = compiled_loss_and_grads(patched, batch)
    assert calls and all(has_mask for has_mask, _ in calls)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert_close_grads(want_grads, grads, rtol=1e-5)


class Decide(torch.nn.Module):
    """Returns x + 1 where the mask is skipped, x - 1 where it is kept."""

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = masking._ignore_causal_mask_sdpa(None, x.shape[0], x.shape[0], 0, 0, self.window)
        return x + 1 if skip else x - 1


@pytest.mark.usefixtures("patched")
def test_compile_skips_but_export_and_windows_keep_transformers_answer():
    x = torch.zeros(6)
    torch._dynamo.reset()
    assert torch.compile(Decide(), backend="eager", fullgraph=True)(x).tolist() == [1.0] * 6
    torch._dynamo.reset()
    assert torch.compile(Decide(window=4), backend="eager", fullgraph=True)(x).tolist() == [-1.0] * 6
    for strict in (False, True):  # export reuses its graph without guards: transformers' traced answer (keep)
        exported = torch.export.export(Decide(), (x,), strict=strict).module()
        assert exported(x).tolist() == [-1.0] * 6
    assert Decide()(x).tolist() == [1.0] * 6  # eager: transformers' own (equal) answer


def test_eager_calls_and_calls_with_other_arguments_run_transformers_code(patched, monkeypatch):
    seen = []
    patch = masking._ignore_causal_mask_sdpa
    monkeypatch.setattr(patch, "original", lambda *a, **k: seen.append(a) or False)
    assert patch(None, 6, 6, 0, 0) is False  # eager: not traced, transformers answers
    assert len(seen) == 1 and len(PARAMS) == 6


def test_models_without_sdpa_attention_are_skipped_with_the_reason():
    model = tiny_models.build("qwen3")
    model.set_attn_implementation("eager")
    handle = engine.apply(model, spec="qwen3", device="cpu")
    try:
        [skip] = [s for s in handle.report.skipped if s.entry == "sdpa_is_causal"]
        assert "model attention is 'eager', not 'sdpa'" in skip.reason
        assert masking._ignore_causal_mask_sdpa is old_rule
    finally:
        handle.revert()
