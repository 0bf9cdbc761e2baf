"""Op-level parity of the Triton kernels (TRITON_INTERPRET=1 on CPU, real launches on a GPU)."""

import pytest
import torch

from engine.kernels.kinds import mrope
from engine.kernels.kinds import rms_norm as rms_norm_kind
from engine.kernels.kinds import rope as rope_kind
from engine.kernels.kinds import swiglu as swiglu_kind
from engine.kernels.kinds import vision_rope as vision_rope_kind
from engine.kernels.kinds.swiglu import SwiGLUOptions
from engine.kernels.triton.ops.mrope import mrope_cos_sin
from engine.kernels.triton.ops.rms_norm import rms_norm
from engine.kernels.triton.ops.rope import rope, vision_rope
from engine.kernels.triton.ops.swiglu import swiglu, swiglu_linear, swiglu_mlp
from tests.layouts import LAYOUTS, relayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def grads_of(fn, inputs, seed=0):
    """Output and input gradients of fn under a random upstream gradient (inputs keep their strides)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def check(fn, ref_fn, inputs, dtype):
    """fn in `dtype` vs the reference in float64: no worse than the reference evaluated in `dtype`."""
    outs, grads = grads_of(fn, inputs)
    ref_outs, ref_grads = grads_of(ref_fn, [t.double() for t in inputs])
    for got, want in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert torch.isfinite(got).all()
        assert rel(got, want) <= TOL[dtype], rel(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 64), (37, 128), (4, 6, 2, 128), (2, 300)])
def test_rms_norm_matches_reference(shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = (torch.randn(shape[-1], device=DEVICE) * 0.2 + 1).to(dtype)
    check(
        lambda a, b: rms_norm(a, b, 1e-6),
        lambda a, b: rms_norm_kind.reference(a, b, 1e-6),
        [x, w],
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gemma_offset(dtype):
    x = torch.randn(9, 48, device=DEVICE, dtype=dtype)
    w = (torch.randn(48, device=DEVICE) * 0.2).to(dtype)
    check(
        lambda a, b: rms_norm(a, b, 1e-6, 1.0, True),
        lambda a, b: rms_norm_kind.reference(a, b, 1e-6, 1.0, "gemma"),
        [x, w],
        dtype,
    )


# The Triton interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest even), so bit-exactness
# against torch is checked in fp16 on CPU and in bf16 as well on a GPU.
EXACT_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_rms_norm_llama_casting_is_bit_exact_forward(dtype, seed):
    torch.manual_seed(seed)
    x = torch.randn(64, 64, device=DEVICE, dtype=dtype)
    w = torch.randn(64, device=DEVICE, dtype=dtype)
    got, want = rms_norm(x, w, 1e-6), rms_norm_kind.reference(x, w, 1e-6)
    if DEVICE == "cuda":
        assert torch.equal(got, want)
        return
    # On CPU the interpreter sums x^2 with numpy, in another order than torch's CPU kernel, so rstd can
    # differ in its last fp32 bit and, rarely, round an output to the neighbouring fp16 value.
    ulp = (want.float().abs() * 2.0**-10).clamp_min(2.0**-24)
    assert bool(((got.float() - want.float()).abs() <= ulp).all())
    assert float((got != want).float().mean()) < 0.01


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_rms_norm_fp32_weight_promotes_output_like_transformers(dtype):
    x = torch.randn(4, 32, device=DEVICE, dtype=dtype)
    w = torch.randn(32, device=DEVICE, dtype=torch.float32)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_kind.reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(dtype):
    gate = torch.randn(3, 7, 301, device=DEVICE, dtype=dtype)
    up = torch.randn(3, 7, 301, device=DEVICE, dtype=dtype)
    check(swiglu, swiglu_kind.reference, [gate, up], dtype)


def _swiglu_linear_reference(gate, up, weight, bias=None):
    return torch.nn.functional.linear(swiglu_kind.reference(gate, up), weight, bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_linear_matches_reference(dtype, bias):
    gate, up = torch.randn(3, 5, 48, device=DEVICE, dtype=dtype), torch.randn(3, 5, 48, device=DEVICE, dtype=dtype)
    weight = (torch.randn(24, 48, device=DEVICE) * 48**-0.5).to(dtype)
    inputs = [gate, up, weight] + ([torch.randn(24, device=DEVICE, dtype=dtype)] if bias else [])
    check(swiglu_linear, _swiglu_linear_reference, inputs, dtype)


def test_swiglu_linear_gives_autograds_gradients_bit_for_bit():
    """Same kernels, same GEMMs as ``down_proj(swiglu(gate, up))``: recomputing the activation changes no bit."""
    gate, up = torch.randn(2, 9, 40, device=DEVICE), torch.randn(2, 9, 40, device=DEVICE)
    weight = torch.randn(16, 40, device=DEVICE)
    ours = grads_of(swiglu_linear, [gate, up, weight])
    theirs = grads_of(lambda g, u, w: torch.nn.functional.linear(swiglu(g, u), w), [gate, up, weight])
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1], strict=True):
        assert torch.equal(a, b)


def test_swiglu_linear_frozen_weight_gets_no_gradient():
    gate = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 32, device=DEVICE)
    swiglu_linear(gate, up, weight).sum().backward()
    want = torch.autograd.grad(_swiglu_linear_reference(gate, up, weight).sum(), (gate, up))
    assert weight.grad is None
    assert rel(gate.grad, want[0]) < 1e-5 and rel(up.grad, want[1]) < 1e-5


def test_swiglu_linear_keeps_gate_and_up_but_not_the_activation():
    """The memory it exists for: saved for backward are gate, up and the weight, nothing of their size else."""
    gate = torch.randn(64, 96, device=DEVICE, requires_grad=True)
    up = torch.randn(64, 96, device=DEVICE, requires_grad=True)
    weight = torch.randn(32, 96, device=DEVICE, requires_grad=True)

    def saved_activation_storages(fn):
        storages = set()

        def pack(t):
            if t.numel() == gate.numel():
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate, up, weight)
        return len(storages)

    unfused = saved_activation_storages(lambda g, u, w: torch.nn.functional.linear(swiglu(g, u), w))
    assert unfused == 3  # gate, up and the activation the down projection keeps
    assert saved_activation_storages(swiglu_linear) == 2


def _swiglu_mlp_reference(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
    linear = torch.nn.functional.linear
    return linear(swiglu_kind.reference(linear(x, w_gate, b_gate), linear(x, w_up, b_up)), w_down, b_down)


def _mlp_inputs(dtype=torch.float32, bias=False, tokens=(3, 5), hidden=32, inter=48, out=24):
    gen = torch.Generator().manual_seed(0)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)

    weights = [draw(inter, hidden, scale=hidden**-0.5), draw(inter, hidden, scale=hidden**-0.5)]
    weights.append(draw(out, inter, scale=inter**-0.5))
    return [draw(*tokens, hidden), *weights] + ([draw(inter), draw(inter), draw(out)] if bias else [])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_mlp_matches_reference(dtype, bias):
    check(swiglu_mlp, _swiglu_mlp_reference, _mlp_inputs(dtype, bias), dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_gives_the_unfused_paths_gradients_bit_for_bit(bias):
    """Recomputing gate and up runs the same GEMMs and kernels on the same values as keeping them."""
    inputs = _mlp_inputs(bias=bias)

    def kept(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
        linear = torch.nn.functional.linear
        return swiglu_linear(linear(x, w_gate, b_gate), linear(x, w_up, b_up), w_down, b_down)

    ours, theirs = grads_of(swiglu_mlp, inputs), grads_of(kept, inputs)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("frozen", ["weights", "input"])
def test_swiglu_mlp_gradients_only_where_asked(frozen):
    """LoRA-style frozen weights get no gradient; an input that needs none gets none, the weights still do."""
    x, w_gate, w_up, w_down = _mlp_inputs()
    leaves = [x.requires_grad_(frozen == "weights")] + [
        w.requires_grad_(frozen == "input") for w in (w_gate, w_up, w_down)
    ]
    swiglu_mlp(*leaves).sum().backward()
    want_leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    _swiglu_mlp_reference(*want_leaves).sum().backward()
    for got, want in zip(leaves, want_leaves, strict=True):
        assert (got.grad is None) == (want.grad is None) == (not got.requires_grad)
        if got.grad is not None:
            assert rel(got.grad, want.grad) < 1e-5


def test_swiglu_mlp_keeps_nothing_intermediate_sized():
    x, w_gate, w_up, w_down = (t.requires_grad_(True) for t in _mlp_inputs(tokens=(4, 16)))
    inter = w_gate.shape[0]
    saved = []

    def pack(t):
        if t.shape[-1] == inter and t.data_ptr() != w_down.data_ptr():
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_mlp(x, w_gate, w_up, w_down)
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _swiglu_mlp_reference(x, w_gate, w_up, w_down)
    assert len(saved) >= 2  # the check sees what unfused autograd keeps: gate, up (and more)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (8, 1)])
def test_rope_matches_reference_on_transposed_views(dtype, heads):
    batch, seq, dim = 2, 6, 32
    hq, hk = heads
    q = torch.randn(batch, seq, hq, dim, device=DEVICE, dtype=dtype).transpose(1, 2)  # like transformers
    k = torch.randn(batch, seq, hk, dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    cos = torch.randn(batch, seq, dim, device=DEVICE, dtype=dtype)
    sin = torch.randn(batch, seq, dim, device=DEVICE, dtype=dtype)

    def ours(q_, k_):
        return rope(q_, k_, cos, sin)

    def ref(q_, k_):
        return rope_kind.reference(q_, k_, cos.double(), sin.double())

    check(ours, ref, [q, k], dtype)
    q_out, _ = rope(q, k, cos, sin)
    assert q_out.stride() == q.stride()


def test_rope_broadcast_batch_cos():
    q = torch.randn(3, 2, 5, 16, device=DEVICE)
    k = torch.randn(3, 1, 5, 16, device=DEVICE)
    cos, sin = torch.randn(1, 5, 16, device=DEVICE), torch.randn(1, 5, 16, device=DEVICE)
    for got, want in zip(rope(q, k, cos, sin), rope_kind.reference(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout,section", [("sectioned", [2, 3, 3]), ("interleaved", [4, 2, 2])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrope_cos_sin_matches_reference(layout, section, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32, device=DEVICE) / 16))
    pos = torch.randint(0, 500, (3, 2, 9), device=DEVICE)
    table = mrope.axis_table(8, section, layout).to(DEVICE)
    got = mrope_cos_sin(pos, inv_freq, table, 1.0, dtype)
    want = mrope.reference(pos, inv_freq, table, 1.0, dtype)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


def test_mrope_axis_tables_match_transformers_layouts():
    assert mrope.axis_table(8, [2, 3, 3]).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert mrope.axis_table(8, [4, 2, 2], "interleaved").tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    with pytest.raises(ValueError, match="must sum"):
        mrope.axis_table(8, [1, 1, 1])


@pytest.mark.parametrize("two_pass", [0, 1])
@pytest.mark.parametrize("shape", [(37, 128), (70, 1024), (5, 3, 600)])
def test_rms_norm_backward_fused_and_two_pass(shape, two_pass):
    from engine.kernels.triton.ops import rms_norm as module

    saved = {key: dict(value) for key, value in module.BWD_TUNING.items()}
    try:
        for key in saved:
            module.set_bwd_tuning(key, dict(saved[key], two_pass=two_pass))
        assert module._bwd_config(shape[-1])[-1] == bool(two_pass)
        x = torch.randn(shape, device=DEVICE, dtype=torch.float32)
        w = torch.randn(shape[-1], device=DEVICE) * 0.2 + 1
        check(
            lambda a, b: rms_norm(a, b, 1e-6),
            lambda a, b: rms_norm_kind.reference(a, b, 1e-6),
            [x, w],
            torch.float32,
        )
    finally:
        for key, value in saved.items():
            module.set_bwd_tuning(key, value)


def test_rms_norm_tail_reduced_weight_grad_stays_right_across_calls():
    """Narrow rows sum dw in the last program through a reused counter: it must be back at 0 after each call."""
    from engine.kernels.triton.ops import rms_norm as module

    for rows in (3, 300, 1, 130, 257, 37):  # 1 to 4 programs (4 is the interpreter's persistent grid)
        x = torch.randn(rows, 128, device=DEVICE, dtype=torch.float32)
        w = torch.randn(128, device=DEVICE) * 0.2 + 1
        (_, got), (_, want) = (
            grads_of(fn, [x, w])
            for fn in (lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_kind.reference(a, b, 1e-6))
        )
        assert rel(got[1], want[1]) < 1e-5, rows
        assert rel(got[0], want[0]) < 1e-5, rows
    assert module._tail_workspaces, "the narrow backward did not take the tail-reduction path"
    assert all(int(counter.item()) == 0 for counter, _ in module._tail_workspaces.values())


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_rms_norm_backward_replays_correctly_from_a_cuda_graph():
    """Under capture the tail reduction gets graph-owned buffers; every replay must give the right dw."""
    x = torch.randn(4096, 128, device="cuda", requires_grad=True)
    w = (torch.randn(128, device="cuda") * 0.2 + 1).requires_grad_(True)
    dy = torch.randn(4096, 128, device="cuda")
    step = lambda: torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), dy)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dx, dw = step()
    for _ in range(3):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            dy.copy_(torch.randn_like(dy))
        graph.replay()
        want = torch.autograd.grad(rms_norm_kind.reference(x, w, 1e-6), (x, w), dy)
        assert rel(dx, want[0]) < 1e-5 and rel(dw, want[1]) < 1e-5


def _same_results(fn, inputs, layout, tol=1e-6):
    """fn on ``inputs`` and on the same values in another memory layout: outputs and gradients must agree."""
    outs, grads = grads_of(fn, inputs)
    moved = [relayout(t, layout) for t in inputs]
    assert not all(m.is_contiguous() for m in moved), layout
    outs_m, grads_m = grads_of(fn, moved)
    for a, b in zip(outs + grads, outs_m + grads_m, strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rms_norm_takes_any_strides_of_x_and_weight(layout):
    x = torch.randn(6, 5, 80, device=DEVICE)
    w = torch.randn(80, device=DEVICE) * 0.2 + 1
    _same_results(lambda a, b: rms_norm(a, b, 1e-6), [x, w], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swiglu_takes_any_strides(layout):
    gate, up = torch.randn(7, 3, 40, device=DEVICE), torch.randn(7, 3, 40, device=DEVICE)
    _same_results(swiglu, [gate, up], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swiglu_linear_takes_any_strides(layout):
    gate, up = torch.randn(7, 3, 40, device=DEVICE), torch.randn(7, 3, 40, device=DEVICE)
    weight, bias = torch.randn(24, 40, device=DEVICE), torch.randn(24, device=DEVICE)
    _same_results(swiglu_linear, [gate, up, weight, bias], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swiglu_mlp_takes_any_strides(layout):
    # cuBLAS picks another GEMM algorithm for other weight layouts: fp32 rounding (~1e-5), not a layout bug
    _same_results(swiglu_mlp, _mlp_inputs(bias=True, tokens=(7, 3)), layout, tol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_takes_any_strides_of_q_k_cos_sin(layout):
    q, k = torch.randn(2, 3, 5, 16, device=DEVICE), torch.randn(2, 1, 5, 16, device=DEVICE)
    cos, sin = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 5, 16, device=DEVICE)
    _same_results(lambda a, b: rope(a, b, relayout(cos, layout), relayout(sin, layout)), [q, k], layout)
    for got, want in zip(
        rope(relayout(q, layout), relayout(k, layout), relayout(cos, layout), relayout(sin, layout)),
        rope_kind.reference(q, k, cos, sin),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vision_rope_takes_any_strides(layout):
    q, k = torch.randn(9, 3, 16, device=DEVICE, dtype=torch.float16), torch.randn(9, 2, 16, device=DEVICE)
    cos, sin = torch.randn(9, 16, device=DEVICE), torch.randn(9, 16, device=DEVICE)
    got = vision_rope(*(relayout(t, layout) for t in (q, k, cos, sin)))
    want = vision_rope_kind.reference(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mrope_cos_sin_takes_any_strides(layout):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32, device=DEVICE) / 16))
    pos = torch.randint(0, 500, (3, 2, 9), device=DEVICE)
    table = mrope.axis_table(8, [2, 3, 3]).to(DEVICE)
    want = mrope.reference(pos, inv_freq, table, 1.0, torch.float32)
    got = mrope_cos_sin(relayout(pos, layout), relayout(inv_freq, layout), relayout(table, layout), 1.0, torch.float32)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_rope_promotes_outputs_like_transformers_and_vision_rope_keeps_input_dtypes():
    q, k = torch.randn(1, 2, 3, 8, device=DEVICE, dtype=torch.bfloat16), torch.randn(1, 1, 3, 8, device=DEVICE)
    cos, sin = torch.randn(1, 3, 8, device=DEVICE), torch.randn(1, 3, 8, device=DEVICE)
    for got, want in zip(rope(q, k, cos, sin), rope_kind.reference(q, k, cos, sin), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    q_out, k_out = vision_rope(q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0])
    assert (q_out.dtype, k_out.dtype) == (torch.bfloat16, torch.float32)


def _entry_point_calls():
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    q, cos = torch.randn(1, 2, 3, 8, device=DEVICE), torch.randn(1, 3, 8, device=DEVICE)
    odd_q, odd_cos = torch.randn(1, 2, 3, 7, device=DEVICE), torch.randn(1, 3, 7, device=DEVICE)
    pos, inv = torch.zeros(3, 1, 4, dtype=torch.long, device=DEVICE), torch.ones(4, device=DEVICE)
    table = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    grad_cos = cos.clone().requires_grad_(True)
    return {
        "rms_norm weight": (lambda: rms_norm(x, w[:7], 1e-6), "does not match the last dim"),
        "rms_norm 2-D weight": (lambda: rms_norm(x, w[None], 1e-6), "does not match the last dim"),
        "rms_norm int": (lambda: rms_norm(x.long(), w, 1e-6), "floating point"),
        "swiglu shapes": (lambda: swiglu(x, x[:, :7]), "same shape"),
        "swiglu dtypes": (lambda: swiglu(x, x.double()), "one floating dtype"),
        "swiglu_linear width": (lambda: swiglu_linear(x, x, w[None, :7]), "does not take 8-wide"),
        "swiglu_linear dtype": (lambda: swiglu_linear(x, x, x.double()), "does not take"),
        "swiglu_mlp up width": (lambda: swiglu_mlp(x, w[None], w[None, :7], w[:, None]), "w_up"),
        "swiglu_mlp down width": (lambda: swiglu_mlp(x, w[None], w[None], w[:7, None].T), "w_down"),
        "swiglu_mlp dtype": (lambda: swiglu_mlp(x, w[None].double(), w[None], w[:, None]), "w_gate"),
        "rope odd head_dim": (lambda: rope(odd_q, odd_q, odd_cos, odd_cos), "head_dim 7 is odd"),
        "rope partial rotary": (lambda: rope(q, q, cos[..., :4], cos[..., :4]), "rotary dims differ"),
        "rope k head_dim": (lambda: rope(q, q[..., :6], cos, cos), "rotary dims differ"),
        "rope 3-D q": (lambda: rope(q[0], q[0], cos, cos), "must be 4-D"),
        "rope seq": (lambda: rope(q, q, cos[:, :2], cos[:, :2]), "do not match"),
        "rope cos batch": (lambda: rope(q, q, cos.expand(2, -1, -1), cos.expand(2, -1, -1)), "do not match"),
        "rope cos/sin shapes": (lambda: rope(q, q, cos, cos[0]), "must both be"),
        "rope cos grad": (lambda: rope(q, q, grad_cos, cos), "require grad"),
        "vision_rope 4-D": (lambda: vision_rope(q, q, cos[0], cos[0]), r"\[seq, heads, dim\]"),
        "vision_rope odd": (lambda: vision_rope(odd_q[0], odd_q[0], odd_cos[0], odd_cos[0]), "is odd"),
        "mrope positions": (lambda: mrope_cos_sin(pos[0, 0], inv, table, 1.0, torch.float32), "must be"),
        "mrope 2 axes": (lambda: mrope_cos_sin(pos[:2], inv, table, 1.0, torch.float32), "must be"),
        "mrope float positions": (lambda: mrope_cos_sin(pos.float(), inv, table, 1.0, torch.float32), "integers"),
        "mrope table": (lambda: mrope_cos_sin(pos, inv, table[:3], 1.0, torch.float32), "must both be"),
    }


@pytest.mark.parametrize("case", list(_entry_point_calls()))
def test_entry_points_reject_bad_shapes_with_one_line_value_error(case):
    call, message = _entry_point_calls()[case]
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64)).to(DEVICE)


def _wrap(mlp, name: str, wrapped: str) -> list[str]:
    """Leave ``mlp.<name>`` bare, hook it, or swap in a subclass adding a path as adapters do; returns the list
    each hook or adapter call appends to."""
    calls: list[str] = []
    layer = getattr(mlp, name)
    if wrapped == "hooked":
        layer.register_forward_hook(lambda *_: calls.append("hook"))
    elif wrapped == "lora-like":
        extra = torch.nn.Linear(layer.in_features, layer.out_features, bias=False).to(DEVICE)

        class Adapted(torch.nn.Linear):
            def forward(self, x):
                calls.append("adapter")
                return super().forward(x) + extra(x)

        adapted = Adapted(layer.in_features, layer.out_features, bias=False).to(DEVICE)
        adapted.weight = layer.weight
        setattr(mlp, name, adapted)
    return calls


@pytest.mark.parametrize("wrapped", ["bare", "hooked", "lora-like"])
def test_swiglu_kernel_class_fuses_the_down_projection_only_when_it_is_a_bare_linear(wrapped):
    """A bare ``nn.Linear`` runs inside ``swiglu_linear`` (activation not saved); a hooked or replaced layer is
    called as it is, so its hook or extra path still runs; the result is the module's either way."""
    from engine.kernels.triton.swiglu import TritonSwiGLUKernel

    mlp = _llama_mlp()
    calls = _wrap(mlp, "down_proj", wrapped)
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    fused = []

    def pack(t):
        if t.numel() == 2 * 5 * 64 and t.shape[-1] == 64:  # [tokens, intermediate]: gate, up, the activation
            fused.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = TritonSwiGLUKernel.run(mlp, SwiGLUOptions(), x)
    calls_with_kernel = list(calls)
    torch.testing.assert_close(out, mlp(x), rtol=1e-5, atol=1e-5)
    if wrapped == "bare":
        assert len(set(fused)) == 2 and not calls_with_kernel
    else:
        assert len(set(fused)) == 3 and calls_with_kernel == ["hook" if wrapped == "hooked" else "adapter"]


@pytest.mark.parametrize("wrapped", ["bare", "hooked", "lora-like"])
def test_swiglu_kernel_class_recompute_projections_keeps_nothing_intermediate_sized(wrapped):
    """``recompute: projections``: plain linears run as ``swiglu_mlp``, anything else is checkpointed (its
    hook or adapter runs again in backward); either way nothing ``[tokens, intermediate]`` is kept and the
    result and gradients are the module's."""
    from engine.kernels.triton.swiglu import TritonSwiGLUKernel

    mlp = _llama_mlp()
    calls = _wrap(mlp, "up_proj", "hooked") if wrapped == "hooked" else _wrap(mlp, "gate_proj", wrapped)
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    kept = []

    def pack(t):
        if t.shape[-1] == 64 and t.untyped_storage().data_ptr() not in params:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = TritonSwiGLUKernel.run(mlp, SwiGLUOptions(recompute="projections"), x)
    got = torch.autograd.grad(out.sum(), [x, *mlp.parameters()])
    calls_with_kernel = list(calls)
    want_out = mlp(x)
    want = torch.autograd.grad(want_out.sum(), [x, *mlp.parameters()])
    assert kept == []
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert calls_with_kernel == {"bare": [], "hooked": ["hook"] * 2, "lora-like": ["adapter"] * 2}[wrapped]
