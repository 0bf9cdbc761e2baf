"""Fused MoE (Triton): parity of output and of x / expert-weight / routing-weight gradients vs transformers."""

import pytest
import torch

import engine
from engine.kernels.kinds.fused_moe import reference as moe_experts_reference
from engine.kernels.triton import moe_tiles
from engine.kernels.triton.fused_moe import TritonFusedMoEKernel
from engine.kernels.triton.ops.moe import fused_moe
from engine.kernels.triton.ops.moe_routing import route
from engine.testing import tiny_models
from tests.layouts import LAYOUTS, relayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def half_precision_factor(dtype):
    """The Triton interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest), which biases every
    stored bf16 intermediate; on CPU the bf16 bound is therefore wider than on a GPU."""
    return 5.0 if (dtype == torch.bfloat16 and DEVICE == "cpu") else 2.5


def make_inputs(tokens, hidden, inter, experts, top_k, dtype, skew=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(DEVICE, dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5).to(DEVICE, dtype)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    if skew:  # most copies on expert 1, experts >= experts // 2 unused except by slot 1
        idx[:, 0] = 1
        idx[:, 1:] = idx[:, 1:] % (experts // 2)
        idx[:, 1:][idx[:, 1:] == 1] = 0
    w = torch.rand(tokens, top_k, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    return x, gate_up, down, idx.to(DEVICE), w, grad


def outputs_and_grads(fn, x, gate_up, down, idx, w, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down, w)]
    out = fn(leaves[0], leaves[1], leaves[2], idx, leaves[3])
    (out.float() * grad.float()).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def transformers_eager(x, gate_up, down, idx, w):
    return moe_experts_reference(x, idx, w, gate_up, down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("skew", [False, True])
def test_fused_moe_fwd_bwd_matches_eager(dtype, skew):
    inputs = make_inputs(41, 64, 32, 8, 2, dtype, skew=skew)
    got = outputs_and_grads(fused_moe, *inputs)
    exact = outputs_and_grads(transformers_eager, *[t.double() if t.is_floating_point() else t for t in inputs])
    eager = outputs_and_grads(transformers_eager, *inputs)
    names = ["out", "dx", "d_gate_up", "d_down", "d_weights"]
    for name, g, e, ref in zip(names, got, eager, exact, strict=True):
        assert torch.isfinite(g).all(), name
        if dtype == torch.float32:
            assert rel(g, ref) < 1e-5, (name, rel(g, ref))
        else:  # no worse than transformers' own run in this dtype
            assert rel(g, ref) <= half_precision_factor(dtype) * rel(e, ref) + 1e-3, (name, rel(g, ref), rel(e, ref))


def test_routing_metadata_is_consistent():
    idx = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3]], device=DEVICE)
    r = route(idx, num_experts=5, block_m=2)
    flat = idx.reshape(-1)
    assert torch.equal(flat[r.order], torch.sort(flat, stable=True).values)
    assert torch.equal(r.order[r.inverse], torch.arange(8, device=DEVICE))
    assert r.expert_start.tolist() == [0, 1, 4, 5, 8] and r.expert_end.tolist() == [1, 4, 5, 8, 8]
    active = r.tile_expert < 5
    assert r.tile_expert[active].tolist() == [0, 1, 1, 2, 3, 3]
    assert r.tile_row_start[active].tolist() == [0, 1, 3, 4, 5, 7]
    assert r.max_tiles == 4 + 5


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_vl_moe"])
def test_spec_patches_experts_with_parity(family):
    model = tiny_models.build(family).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in tiny_models.sample_batch(model).items()}
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    model.zero_grad()
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with engine.apply(model, spec=family, device="cuda", verbose=False) as handle:
        assert any(p.kernel == "TritonFusedMoEKernel" for p in handle.report.patched), handle.report.summary()
        loss = model(**batch).loss
        loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        p = dict(model.named_parameters())[name]
        assert rel(p.grad, g) < 1e-4, name
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in weights.items())


def test_apply_available_kernels_leaves_experts_alone():
    model = tiny_models.build("qwen3_moe")
    report = engine.plan(model, device="cuda")
    assert any(s.entry == "fused_moe" and "manual" in s.reason for s in report.skipped)


# --- tile configurations within the device's shared memory -------------------------------------------------

H100_SHARED_MEMORY = 232448  # the opt-in limit Triton reported on the H100


def test_shared_memory_estimate_reproduces_what_triton_reported_for_fp32():
    """Triton 3.6 on an H100 refused the bf16-tuned up-projection tile in fp32 with these byte counts."""
    for block_m, required in ((64, 245760), (128, 294912)):
        config = moe_tiles.TileConfig(block_m, 128, 64, 8, 4)
        assert moe_tiles.shared_memory_bytes(config, 4, b_tiles=2) - moe_tiles.MARGIN == required
        assert moe_tiles.shared_memory_bytes(config, 4, b_tiles=2) > H100_SHARED_MEMORY


@pytest.mark.parametrize("block_m", moe_tiles.ROW_BLOCK_M)
@pytest.mark.parametrize("limit", [H100_SHARED_MEMORY, 166912, 101376, 49152])  # H100, A100, consumer, small
@pytest.mark.parametrize("itemsize", [2, 4])
def test_chosen_tiles_fit_the_limit_and_keep_the_tuned_ones_where_they_fit(itemsize, limit, block_m):
    tiles = moe_tiles.choose_tiles(block_m, itemsize, limit)
    assert tiles is not None and tiles.block_m == block_m
    for name, config in tiles.configs.items():
        b_tiles = moe_tiles.B_TILES.get(name, 1)
        assert moe_tiles.shared_memory_bytes(config, itemsize, b_tiles) <= limit, (name, config)
        candidates = moe_tiles.ROW_GEMM_CANDIDATES.get(name)
        first = (
            moe_tiles.TileConfig(block_m, *candidates[0])
            if candidates
            else moe_tiles.TileConfig(*moe_tiles.WGRAD_CANDIDATES[0])
        )
        if moe_tiles.shared_memory_bytes(first, itemsize, b_tiles) <= limit:
            assert config == first, name  # the tuned configuration wherever it fits
    if itemsize == 2 and limit == H100_SHARED_MEMORY:
        assert tiles["up_swiglu"] == moe_tiles.TileConfig(block_m, 128, 64, 8, 4)
    if itemsize == 4 and limit == H100_SHARED_MEMORY:
        assert tiles["up_swiglu"].num_stages < 4  # the bf16 tile does not fit in fp32


def test_no_tiles_when_nothing_fits_and_the_reason_names_dtype_and_limit(monkeypatch):
    assert moe_tiles.choose_tiles(64, 4, 4096) is None
    monkeypatch.setattr(moe_tiles, "shared_memory_limit", lambda device: 4096)
    reason = moe_tiles.unfit_reason(torch.float32, torch.device("cuda", 0))
    assert "torch.float32" in reason and "4096 bytes" in reason
    monkeypatch.setattr(moe_tiles, "shared_memory_limit", lambda device: H100_SHARED_MEMORY)
    assert moe_tiles.unfit_reason(torch.float32, torch.device("cuda", 0)) is None


def test_kernel_class_declines_with_a_reason_where_no_tile_fits(monkeypatch):
    from engine.kernels.kinds.base import NoOptions

    model = tiny_models.build("qwen3_moe").to(DEVICE)
    experts = model.model.layers[0].mlp.experts
    monkeypatch.setattr(moe_tiles, "shared_memory_limit", lambda device: 4096)
    reason = TritonFusedMoEKernel.incompatibility(experts, NoOptions())
    assert reason is not None and "shared memory" in reason
    report = engine.plan(model, spec="qwen3_moe", device="cuda")
    skipped = [s for s in report.skipped if s.entry == "fused_moe"]
    assert skipped and "shared memory" in skipped[0].reason
    # a call that reaches the kernel anyway runs transformers' forward
    x, _, _, idx, w, _ = make_inputs(
        5, experts.gate_up_proj.shape[2], experts.gate_up_proj.shape[1] // 2, 4, 2, torch.float32
    )
    idx = idx % experts.num_experts
    with torch.no_grad():
        got = TritonFusedMoEKernel.run(experts, NoOptions(), x, idx, w)
        want = type(experts).forward(experts, x, idx, w)
    assert torch.equal(got, want)


# --- shapes, strides and argument checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,top_k,skew",
    [
        (1, 64, 32, 8, 2, False),  # one token
        (7, 32, 16, 1, 1, False),  # one expert, top-1
        (16, 32, 16, 4, 4, False),  # top-k = experts
        (12, 97, 47, 7, 3, False),  # hidden / intermediate not multiples of any tile, prime expert count
        (32, 64, 32, 8, 2, "one"),  # every token to expert 0
    ],
)
def test_fused_moe_edge_shapes_match_fp64(tokens, hidden, inter, experts, top_k, skew):
    inputs = list(make_inputs(tokens, hidden, inter, experts, top_k, torch.float32))
    if skew == "one":
        inputs[3] = torch.zeros_like(inputs[3])
    got = outputs_and_grads(fused_moe, *inputs)
    exact = outputs_and_grads(transformers_eager, *[t.double() if t.is_floating_point() else t for t in inputs])
    for name, g, ref in zip(["out", "dx", "d_gate_up", "d_down", "d_weights"], got, exact, strict=True):
        assert rel(g, ref) < 1e-5, (name, rel(g, ref))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_moe_takes_any_strides_of_every_argument(layout):
    x, gate_up, down, idx, w, grad = make_inputs(13, 48, 24, 6, 2, torch.float32)
    want = outputs_and_grads(fused_moe, x, gate_up, down, idx, w, grad)
    moved = [relayout(t, layout) for t in (x, gate_up, down, idx, w)]
    assert not all(t.is_contiguous() for t in moved)
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in moved]
    out = fused_moe(*leaves)
    (out * grad).sum().backward()
    got = [out.detach()] + [leaves[i].grad for i in (0, 1, 2, 4)]
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_fused_moe_rejects_mismatched_shapes_with_one_line_value_error():
    x, gate_up, down, idx, w, _ = make_inputs(5, 32, 16, 4, 2, torch.float32)
    cases = {
        "x 3-D": ((x[None], gate_up, down, idx, w), "must be \\[T, H\\]"),
        "gate_up hidden": ((x, gate_up[..., :31], down, idx, w), "do not match"),
        "odd gate_up": ((x, gate_up[:, :31], down, idx, w), "do not match"),
        "down experts": ((x, gate_up, down[:3], idx, w), "do not match"),
        "index tokens": ((x, gate_up, down, idx[:4], w[:4]), "must both be \\[T, K\\]"),
        "weights shape": ((x, gate_up, down, idx, w[:, :1]), "must both be \\[T, K\\]"),
        "float index": ((x, gate_up, down, idx.float(), w), "integer expert ids"),
        "dtypes": ((x.double(), gate_up, down, idx, w), "one floating dtype"),
        "int weights": ((x, gate_up, down, idx, idx), "floating point"),
    }
    for name, (args, message) in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            fused_moe(*args)
        assert "\n" not in str(info.value), name


@pytest.mark.parametrize("kernel_name", ["triton", "npu"])
def test_every_moe_kernel_refuses_calls_outside_the_kinds_routing_contract(kernel_name):
    """The per-call condition lives with the kind (``KernelKind.fits``): each device's class inherits it."""
    from engine.kernels.kinds.base import NoOptions
    from engine.kernels.npu.fused_moe import NpuFusedMoEKernel
    from engine.kernels.triton.fused_moe import TritonFusedMoEKernel

    kernel = {"triton": TritonFusedMoEKernel, "npu": NpuFusedMoEKernel}[kernel_name]
    x, index, weights = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    assert kernel.supports(NoOptions(), x, index, weights)
    assert not kernel.supports(NoOptions(), x[None], index, weights)  # 3-D tokens
    assert not kernel.supports(NoOptions(), x, index.float(), weights)  # float expert ids
    assert not kernel.supports(NoOptions(), x, index, weights[:, :1])  # [T, K] mismatch
    assert not kernel.supports(NoOptions(), x[:4], index, weights)  # token count mismatch
