"""The NPU fused MoE kernel: its own backward through grouped matmuls, routing on the device, weights as views."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from engine.kernels.kinds.base import NoOptions
from engine.kernels.npu.fused_moe import NpuFusedMoEKernel
from engine.kernels.npu.grouped_matmul import expert_counts
from engine.testing import tiny_models
from engine.testing.torch_npu_standin import calls

# aten ops that read device values on the host or whose output shape depends on values (and so sync)
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select", "repeat_interleave", "item")
COPYING_OPS = ("clone", "_to_copy", "copy_", "contiguous")


def _experts(dtype=torch.float32):
    model = tiny_models.build("qwen3_moe", dtype=dtype)
    return model, model.model.layers[0].mlp.experts


def _inputs(dtype, tokens=10, experts=8, top_k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    w = torch.rand(tokens, top_k, generator=gen).to(dtype)
    dy = torch.randn(tokens, 64, generator=gen).to(dtype)
    return x, idx, w, dy


def _fwd_bwd(experts, x, idx, w, dy):
    """Output and gradients of (hidden states, routing weights, gate_up_proj, down_proj), in fp32."""
    experts.zero_grad(set_to_none=True)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = experts(x, idx, w)
    out.backward(dy)
    grads = (x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    assert all(g is not None for g in grads), "a gradient is missing"
    return out.detach().float(), [g.float() for g in grads]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_experts_fwd_bwd_match_transformers_fp32(npu_standin):
    model, experts = _experts()
    x, idx, w, dy = _inputs(torch.float32)
    want, want_grads = _fwd_bwd(experts, x, idx, w, dy)
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False):
        calls.clear()
        got, got_grads = _fwd_bwd(experts, x, idx, w, dy)
        assert calls["npu_grouped_matmul"] == 6  # 2 forward, 2 dgrad, 2 wgrad (K split)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g, ref in zip(("hidden", "routing weights", "gate_up", "down"), got_grads, want_grads, strict=True):
        assert _rel(g, ref) <= 1e-5, f"{name} gradient off by {_rel(g, ref):.2e}"


@pytest.mark.parametrize("fused_routing", [True, False], ids=["permute_ops", "torch_routing"])
def test_experts_bf16_no_worse_than_twice_transformers(npu_standin, monkeypatch, fused_routing):
    if not fused_routing:  # a build without the permute ops routes in plain torch
        monkeypatch.delattr(npu_standin, "npu_moe_token_permute")
    model32, experts32 = _experts()
    x, idx, w, dy = _inputs(torch.float32)
    ref, ref_grads = _fwd_bwd(experts32, x, idx, w, dy)
    model, experts = _experts(torch.bfloat16)
    bf16 = [t.to(torch.bfloat16) for t in (x, w, dy)]
    own, own_grads = _fwd_bwd(experts, bf16[0], idx, bf16[1], bf16[2])
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False):
        calls.clear()
        got, got_grads = _fwd_bwd(experts, bf16[0], idx, bf16[1], bf16[2])
        assert bool(calls["npu_moe_token_permute"]) == fused_routing and calls["npu_grouped_matmul"] == 6
    assert _rel(got, ref) <= 2 * _rel(own, ref)
    for g, o, r in zip(got_grads, own_grads, ref_grads, strict=True):
        assert _rel(g, r) <= 2 * _rel(o, r)


class _Recorder(TorchDispatchMode):
    """Top-level aten/custom ops (an op's own internals run below the mode and are not seen)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _storages(value):
    if isinstance(value, torch.Tensor):
        return {value.untyped_storage().data_ptr()}
    if isinstance(value, list | tuple):
        return set().union(*(_storages(v) for v in value)) if value else set()
    return set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_sync_and_expert_weights_only_viewed(npu_standin, monkeypatch, dtype):
    model, experts = _experts(dtype)
    x, idx, w, dy = _inputs(dtype)
    for name in ("tolist", "cpu", "numpy"):  # host reads that bypass the dispatcher
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n}() called"))
    weights = _storages([experts.gate_up_proj, experts.down_proj])
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False), _Recorder() as seen:
        _fwd_bwd(experts, x, idx, w, dy)
    names = [str(func) for func, _, _ in seen.calls]
    assert not [n for n in names if any(s in n for s in SYNCING_OPS)], names
    gmm_weights = [args[1][0] for func, args, _ in seen.calls if "npu_grouped_matmul" in str(func)]
    assert len(gmm_weights) == 6
    three_d = [t for t in gmm_weights if t.dim() == 3]  # forward and dgrad operands (wgrad's is the input)
    assert len(three_d) == 4 and all(_storages(t) <= weights for t in three_d)
    copies = [n for func, args, kwargs in seen.calls for n in [str(func)] if any(c in n for c in COPYING_OPS)]
    copied_weights = [
        str(func)
        for func, args, kwargs in seen.calls
        if any(c in str(func) for c in COPYING_OPS) and _storages(list(args) + list(kwargs.values())) & weights
    ]
    assert not copied_weights, f"expert weights copied by {copied_weights} (copies seen: {copies})"


def test_expert_counts_stay_on_device_and_match_bincount():
    idx = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert expert_counts(idx, 5).tolist() == torch.bincount(idx.reshape(-1), minlength=5).tolist()
    assert expert_counts(idx, 5).dtype == torch.int64


def test_mixed_dtype_experts_decline_to_the_original(npu_standin):
    model, experts = _experts()  # fp32 expert weights
    x, idx, w, _ = _inputs(torch.bfloat16)
    want = experts(x, idx, w)  # transformers' experts implementation handles the mix
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False):
        calls.clear()
        got = experts(x, idx, w)
        assert not calls["npu_grouped_matmul"]
    torch.testing.assert_close(got, want)


def test_group_limit_is_1024_experts(npu_standin):
    meta = SimpleNamespace(gate_up_proj=torch.empty(1025, 64, 32, device="meta"))
    assert "1024 groups" in NpuFusedMoEKernel.incompatibility(meta, NoOptions())
    meta.gate_up_proj = torch.empty(1024, 64, 32, device="meta")
    assert NpuFusedMoEKernel.incompatibility(meta, NoOptions()) is None
    meta._is_expert_parallel = True  # transformers' expert parallelism routes to a sentinel id
    assert "expert-parallel" in NpuFusedMoEKernel.incompatibility(meta, NoOptions())


def test_more_than_128_experts_are_fused(npu_standin):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=200,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
    )
    model = AutoModelForCausalLM.from_config(config)
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False) as handle:
        assert "fused_moe" in {p.entry for p in handle.report.patched}, handle.report.summary()
