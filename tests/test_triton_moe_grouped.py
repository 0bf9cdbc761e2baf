"""The fused MoE's CUTLASS path (``moe_grouped``): bf16 on Hopper, expert GEMMs through ``torch._grouped_mm``.

On a CPU the path is forced (``_hopper``) and ``torch._grouped_mm`` runs torch's reference loop; the row kernels
run under the Triton interpreter. On an H100/H200 the same tests run the CUTLASS kernels themselves.
"""

import pytest
import torch

import engine
from engine.kernels.triton.ops import moe_grouped
from engine.kernels.triton.ops.moe import fused_moe
from engine.testing import tiny_models
from tests.layouts import LAYOUTS, relayout
from tests.test_triton_moe import (
    DEVICE,
    half_precision_factor,
    make_inputs,
    outputs_and_grads,
    rel,
    transformers_eager,
)

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
NAMES = ["out", "dx", "d_gate_up", "d_down", "d_weights"]


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts ``torch._grouped_mm`` calls; on a CPU, also routes bf16 calls to the grouped path."""
    if DEVICE == "cpu":
        monkeypatch.setattr(moe_grouped, "_hopper", lambda device: True)
    elif torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the CUTLASS grouped path runs on compute capability 9.x only")
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls


@pytest.mark.parametrize("skew", [False, True])
def test_grouped_path_matches_fp64_as_closely_as_transformers_bf16(grouped_calls, skew):
    inputs = make_inputs(41, 64, 32, 8, 2, torch.bfloat16, skew=skew)
    got = outputs_and_grads(fused_moe, *inputs)
    assert len(grouped_calls) == 6  # two forward GEMMs, four backward
    exact = outputs_and_grads(transformers_eager, *[t.double() if t.is_floating_point() else t for t in inputs])
    eager = outputs_and_grads(transformers_eager, *inputs)
    for name, g, e, ref in zip(NAMES, got, eager, exact, strict=True):
        assert torch.isfinite(g).all(), name
        bound = half_precision_factor(torch.bfloat16) * rel(e, ref) + 1e-3
        assert rel(g, ref) <= bound, (name, rel(g, ref), rel(e, ref))


def test_grouped_path_gives_experts_without_rows_zero_weight_gradients(grouped_calls):
    x, gate_up, down, idx, w, grad = make_inputs(24, 32, 16, 8, 2, torch.bfloat16)
    idx = idx % 3  # experts 3..7 get no rows
    idx[:, 1] = (idx[:, 0] + 1) % 3
    _, _, d_gate_up, d_down, _ = outputs_and_grads(fused_moe, x, gate_up, down, idx, w, grad)
    assert grouped_calls
    assert d_gate_up[3:].abs().max() == 0 and d_down[3:].abs().max() == 0
    assert d_gate_up[:3].abs().max() > 0 and d_down[:3].abs().max() > 0


def test_grouped_path_needs_only_the_gradients_asked_for(grouped_calls):
    x, gate_up, down, idx, w, grad = make_inputs(16, 32, 16, 4, 2, torch.bfloat16)
    leaf = down.clone().requires_grad_(True)
    out = fused_moe(x, gate_up, leaf, idx, w)
    (out.float() * grad.float()).sum().backward()
    assert len(grouped_calls) == 2 + 2  # d_act and d_down only: no dx or d_gate_up GEMMs
    full = outputs_and_grads(fused_moe, x, gate_up, down, idx, w, grad)
    torch.testing.assert_close(leaf.grad, full[3], rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_path_takes_strided_activations_and_falls_back_for_unaligned_weights(grouped_calls, layout):
    x, gate_up, down, idx, w, grad = make_inputs(13, 48, 24, 6, 2, torch.bfloat16)
    want = outputs_and_grads(fused_moe, x, gate_up, down, idx, w, grad)
    grouped_calls.clear()
    moved = [relayout(t, layout) for t in (x, gate_up, down, idx, w)]
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in moved]  # kept strided (clone is not)
    out = fused_moe(*leaves)
    (out.float() * grad.float()).sum().backward()
    got = [out.detach()] + [leaves[i].grad for i in (0, 1, 2, 4)]
    aligned = all(moe_grouped._cutlass_layout(t) for t in moved[1:3])
    assert bool(grouped_calls) == aligned, (layout, aligned)
    for name, g, e in zip(NAMES, got, want, strict=True):
        if aligned:
            torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2, msg=name)
        else:  # the Triton GEMMs: a different bf16 rounding, the same bound against fp64
            assert rel(g, e) < 2e-2, (name, rel(g, e))


def test_only_aligned_bf16_on_hopper_takes_the_grouped_path(grouped_calls, monkeypatch):
    x, gate_up, down, _, _, _ = make_inputs(8, 32, 16, 4, 2, torch.bfloat16)
    assert moe_grouped.fits(x, gate_up, down, rows=16)
    assert not moe_grouped.fits(x, gate_up, down, rows=0)
    assert not moe_grouped.fits(x, gate_up, down, rows=2**31)
    for dtype in (torch.float32, torch.float16):
        assert not moe_grouped.fits(x.to(dtype), gate_up.to(dtype), down.to(dtype), rows=16), dtype
    odd_x, odd_gate_up, odd_down, _, _, _ = make_inputs(8, 36, 16, 4, 2, torch.bfloat16)
    assert not moe_grouped.fits(odd_x, odd_gate_up, odd_down, rows=16)  # 72-byte rows
    shifted = torch.empty(gate_up.numel() + 1, dtype=gate_up.dtype, device=gate_up.device)[1:].view_as(gate_up)
    assert not moe_grouped.fits(x, shifted, down, rows=16)  # starts 2 bytes past an allocation
    monkeypatch.setattr(moe_grouped, "_hopper", lambda device: False)
    assert not moe_grouped.fits(x, gate_up, down, rows=16)


def test_grouped_path_compiles_without_graph_breaks(grouped_calls):
    x, gate_up, down, idx, w, grad = make_inputs(16, 32, 16, 4, 2, torch.bfloat16)
    want = outputs_and_grads(fused_moe, x, gate_up, down, idx, w, grad)
    compiled = torch.compile(fused_moe, backend="aot_eager", fullgraph=True)
    got = outputs_and_grads(compiled, x, gate_up, down, idx, w, grad)
    for name, g, e in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)


def test_plan_names_the_expert_gemm_path(grouped_calls):
    notes = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_models.build("qwen3_moe", dtype=dtype).to(DEVICE)
        plan = engine.plan(model, spec="qwen3_moe", device="cuda")
        notes[dtype] = [p.note for p in plan.patches if p.entry.name == "fused_moe"]
    assert notes[torch.bfloat16] == ["expert GEMMs: torch._grouped_mm (CUTLASS)"]
    assert notes[torch.float32] == ["expert GEMMs: Triton"]


def test_grouped_path_keeps_no_activation_for_backward(grouped_calls, monkeypatch):
    """Backward recomputes silu(gate) * up from the kept pre-activation: T*K*I fewer elements saved per layer."""
    tokens, hidden, inter, top_k = 16, 32, 16, 2
    x, gate_up, down, idx, w, _ = make_inputs(tokens, hidden, inter, 4, top_k, torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in (x, gate_up, down, w)]

    def saved_bytes() -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused_moe(leaves[0], leaves[1], leaves[2], idx, leaves[3])
        return sum(total)

    grouped = saved_bytes()
    assert grouped_calls
    monkeypatch.setattr(moe_grouped, "fits", lambda *args, **kwargs: False)
    assert saved_bytes() - grouped == tokens * top_k * inter * 2


def test_a_failing_plan_note_is_reported_not_raised(monkeypatch):
    from engine.kernels.triton.fused_moe import TritonFusedMoEKernel

    def broken(module, options):
        raise RuntimeError("no device properties")

    monkeypatch.setattr(TritonFusedMoEKernel, "plan_note", broken)
    plan = engine.plan(tiny_models.build("qwen3_moe").to(DEVICE), spec="qwen3_moe", device="cuda")
    notes = [p.note for p in plan.patches if p.entry.name == "fused_moe"]
    assert notes == ["no plan note (RuntimeError: no device properties)"]


@pytest.mark.parametrize("rows_per_program", [1, 2, 8])
def test_row_kernels_give_the_same_bits_for_any_launch_shape(grouped_calls, monkeypatch, rows_per_program):
    """Rows per program and column blocks change how the row kernels are launched, never a result's bits
    (82 rows: 8 per program leave a ragged last block; 16 of 32 columns per program: two column blocks)."""
    from engine.kernels.triton.ops import moe_rows

    inputs = make_inputs(41, 64, 32, 8, 2, torch.bfloat16, skew=True)
    want = outputs_and_grads(fused_moe, *inputs)
    shapes = {name: (rows_per_program, 16, 1) for name in moe_rows.TUNING}
    monkeypatch.setattr(moe_rows, "TUNING", shapes)
    for name, g, w in zip(NAMES, outputs_and_grads(fused_moe, *inputs), want, strict=True):
        assert torch.equal(g, w), name
