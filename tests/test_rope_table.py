"""``rope_table``: under ``torch.compile`` a text model's rotary ``(cos, sin)`` table comes from one operator, so the
compiled graph reads it instead of recomputing ``cos``/``sin`` inside every rotary; eager calls run the module."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import engine
from engine.kernels.kinds import get_kind
from engine.kernels.kinds.rope_table import reference
from engine.kernels.portable import rope_table as kernels
from engine.kernels.portable.ops.rope_table import rope_table
from engine.testing import tiny_models
from tests.parity import assert_close_grads, loss_and_grads

KIND = get_kind("rope_table")
TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
SCALED = {  # rope types with a fixed inv_freq; yarn also scales the table (attention_scaling ~1.14)
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "rope_theta": 10000.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}
UPDATING = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "longrope": {
        "rope_type": "longrope",
        "factor": 4.0,
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 64,
    },
}


def llama_with(rope_parameters: dict) -> torch.nn.Module:
    config = LlamaConfig(**tiny_models.DENSE, rope_parameters=rope_parameters)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def rotary_of(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


def positions(batch: int = 2, seq: int = 9, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + seq).repeat(batch, 1) + torch.arange(batch)[:, None] * 1000


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_families_pass_the_check_and_probe_and_get_patched(family):
    model = tiny_models.build(family)
    rotary = rotary_of(model)
    assert KIND.check(rotary, None) is None and KIND.probe(rotary, None) is None
    report = engine.plan(model, device="cpu")
    assert [p.entry.name for p in report.patches if p.entry.kernel == "rope_table"] == ["rope_table"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", ["default", *SCALED])
def test_reference_is_transformers_table_bit_for_bit(rope, dtype):
    model = tiny_models.build("llama") if rope == "default" else llama_with(SCALED[rope])
    rotary = rotary_of(model)
    x = torch.randn(2, 9, 8, dtype=dtype)
    ids = positions(start=4090)
    want = rotary(x, ids)
    got = rope_table(rotary.inv_freq, ids, float(rotary.attention_scaling), dtype)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if rope == "yarn":  # the scaling is part of the table (a kernel that drops it fails here)
        assert rotary.attention_scaling > 1.1


@pytest.mark.parametrize("rope", sorted(UPDATING))
def test_rope_types_that_update_inv_freq_are_refused(rope):
    reason = KIND.check(rotary_of(llama_with(UPDATING[rope])), None)
    assert reason is not None and "updates inv_freq" in reason


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl_moe"])
def test_multimodal_tables_are_refused(family):
    text_rotary = [m for n, m in tiny_models.build(family).named_modules() if n.endswith("language_model.rotary_emb")]
    assert len(text_rotary) == 1
    assert "multimodal" in KIND.check(text_rotary[0], None)


def test_a_module_with_other_math_fails_the_probe():
    rotary = rotary_of(tiny_models.build("llama"))

    class Interleaved(type(rotary)):
        """Pairs (0,1), (2,3), ...: the same angles in another layout."""

        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * self.inv_freq.float()
            angles = freqs.repeat_interleave(2, dim=-1)
            return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    other = object.__new__(Interleaved)
    other.__dict__.update(rotary.__dict__)
    assert KIND.check(other, None) is None
    assert "disagree" in KIND.probe(other, None)


def test_eager_calls_run_the_module_and_the_kernel_only_under_compile(monkeypatch):
    model = tiny_models.build("qwen3")
    rotary = rotary_of(model)
    runs = []
    real = kernels.RopeTableKernel.run.__func__
    monkeypatch.setattr(kernels.RopeTableKernel, "run", classmethod(lambda *a: runs.append(1) or real(*a)))
    x, ids = torch.randn(2, 9, 16), positions()
    want = rotary(x, ids)
    with engine.apply(model, spec="qwen3", device="cpu", verbose=False):
        got = rotary(x, ids)
        assert not runs
        compiled = torch.compile(rotary, backend="aot_eager", fullgraph=True)(x, ids)
        assert runs
    for g, c, w in zip(got, compiled, want, strict=True):
        assert torch.equal(g, w) and torch.equal(c, w)
    assert "forward" not in rotary.__dict__
    assert KIND.fits(x, ids) and not KIND.fits(x, ids[None].expand(3, -1, -1))  # other ids: the module's forward


class GraphOps:
    """A compile backend recording the target of every function and method call in Dynamo's graph."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN204
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        return gm


def compiled_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], backend):  # noqa: ANN001
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    model.zero_grad(set_to_none=True)
    loss = compiled(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen3", "llama"])  # (qwen3_moe's experts do not compile on CPU everywhere)
def test_compiled_graph_reads_the_table_and_matches_the_unpatched_compiled_model(family):
    model = tiny_models.build(family)
    batch = tiny_models.sample_batch(model)
    ref_loss, ref_grads = compiled_step(model, batch, "aot_eager")
    before = GraphOps()
    compiled_step(model, batch, before)
    with engine.apply(model, spec=family, device="cpu", verbose=False):
        loss, grads = compiled_step(model, batch, "aot_eager")
        after = GraphOps()
        compiled_step(model, batch, after)
    assert any("cos" in t for t in before.targets) and any("sin" in t for t in before.targets)
    assert sum("rope_table" in t for t in after.targets) == 1  # one table per forward, shared by every layer
    assert not any("cos" in t or "sin" in t for t in after.targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-5)
    eager_loss, _ = loss_and_grads(model, batch)
    torch.testing.assert_close(eager_loss, ref_loss, rtol=1e-6, atol=1e-6)


def test_dynamic_shapes_and_the_fake_implementation():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    for seq in (7, 12):
        ids = positions(seq=seq)
        torch.library.opcheck(rope_table, (inv_freq, ids, 1.25, torch.bfloat16))
    table = torch.compile(lambda f, p: rope_table(f, p, 1.0, torch.float32), backend="aot_eager", dynamic=True)
    for seq in (7, 12, 20):
        ids = positions(seq=seq)
        for g, w in zip(table(inv_freq, ids), reference(inv_freq, ids, 1.0, torch.float32), strict=True):
            assert g.shape == (2, seq, 16)
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_differentiated_table_runs_the_module():
    """An ``inv_freq`` that requires grad: the compiled patched table is differentiable exactly where the module's
    own is (transformers releases that compute it under ``no_grad`` give no gradient either way)."""
    model = tiny_models.build("llama")
    rotary = rotary_of(model)
    rotary.inv_freq.requires_grad_(True)
    x = torch.randn(2, 9, 16)

    def table_and_grad(fn):  # noqa: ANN001, ANN202
        rotary.inv_freq.grad = None
        cos, _ = fn(x, positions())
        if cos.requires_grad:
            cos.sum().backward()
        return cos.detach(), rotary.inv_freq.grad

    want, want_grad = table_and_grad(rotary)
    with engine.apply(model, spec="llama", device="cpu", verbose=False):
        got, grad = table_and_grad(torch.compile(rotary, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, want)
    assert (grad is None) == (want_grad is None)
    if grad is not None:
        torch.testing.assert_close(grad, want_grad)
