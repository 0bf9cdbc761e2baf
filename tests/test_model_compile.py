"""``torch.compile`` of a patched model: no graph break caused by the engine, parity with the compiled unpatched model.

On CPU the Triton kernels run through the interpreter with the ``aot_eager`` backend; on a GPU the same tests run
with Inductor, and a ``mode="reduce-overhead"`` (CUDA graphs) training step runs too.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import engine
from engine.testing import tiny_models
from tests.parity import assert_close_grads, loss_and_grads

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="Inductor and CUDA graphs need a GPU")]
BACKENDS = ["aot_eager", pytest.param("inductor", marks=needs_gpu)]
# every engine operator a compiled patched family must contain (the kernels really are in the graph); the tiny
# models' MLPs end in a bare nn.Linear, so their SwiGLU runs as swiglu_linear (activation recomputed in backward)
EXPECTED_OPS = {
    "qwen3": {"rms_norm", "swiglu_linear", "rope", "rope_table", "linear_cross_entropy"},
    "qwen3_moe": {"rms_norm", "swiglu_linear", "rope", "rope_table", "fused_moe", "linear_cross_entropy"},
    "qwen2_vl": {"rms_norm", "swiglu_linear", "rope", "mrope_cos_sin", "linear_cross_entropy"},
}


def compiled_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], backend: str):
    """Loss and gradients of one compiled fwd+bwd with ``fullgraph=True``, and the captured graphs."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    model.zero_grad(set_to_none=True)
    loss = compiled(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, counter


def engine_ops_in(counter: CompileCounterWithBackend) -> set[str]:
    code = "\n".join(g.code for g in counter.graphs)
    return {name for names in EXPECTED_OPS.values() for name in names if f"torch.ops.engine.{name}." in code}


# kernels the compiler generates itself run as original code under torch.compile unless ENGINE_UNDER_COMPILE=kernel
COMPILER_KEEPS = {"linear_cross_entropy", "fused_moe", "rope_table", "mrope_cos_sin"}


@pytest.mark.parametrize("policy", ["default", "kernel"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(EXPECTED_OPS))
def test_compiled_patched_model_matches_compiled_unpatched(family, backend, policy, monkeypatch):
    """The patched model compiles as one graph holding the engine's operators and matches the unpatched model,
    compiled where it compiles with ``fullgraph=True`` (transformers 5.17's experts do not on CPU), else eager."""
    if policy == "kernel":
        monkeypatch.setenv("ENGINE_UNDER_COMPILE", "kernel")
    expected = EXPECTED_OPS[family] if policy == "kernel" else EXPECTED_OPS[family] & COMPILER_KEEPS
    model = tiny_models.build(family).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in tiny_models.sample_batch(model).items()}
    ref_loss, ref_grads = loss_and_grads(model, batch)
    try:
        ref_loss, ref_grads, _ = compiled_step(model, batch, backend)
    except Exception as exc:  # noqa: BLE001 (any compile failure of the unpatched model)
        assert family == "qwen3_moe", f"unpatched {family} no longer compiles with fullgraph=True: {exc}"
    with engine.apply(model, spec=family, device="cuda", verbose=False):
        loss, grads, counter = compiled_step(model, batch, backend)
    assert counter.frame_count == 1  # one graph: no break caused by the engine
    assert engine_ops_in(counter) == expected
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_reduce_overhead_training_steps(family):
    """Three AdamW steps of a patched model compiled with CUDA graphs track the unpatched eager run."""

    def train(patched: bool) -> list[float]:
        model = tiny_models.build(family).to(DEVICE)
        batch = {k: v.to(DEVICE) for k, v in tiny_models.sample_batch(model).items()}
        handle = engine.apply(model, spec=family, device="cuda", verbose=False) if patched else None
        step_model = torch.compile(model, mode="reduce-overhead") if patched else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            loss = step_model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        if handle is not None:
            handle.revert()
        return losses

    torch._dynamo.reset()
    want, got = train(False), train(True)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
