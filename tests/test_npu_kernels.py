"""NPU kernels: declared torch_npu versions and ops, RoPE dtypes and partial rotary, RMSNorm dtype pairs."""

import pytest
import torch

import engine
from engine.kernels.kinds.base import NoOptions
from engine.kernels.kinds.rms_norm import RMSNormOptions, reference
from engine.kernels.kinds.rope import rotate_half
from engine.kernels.npu import (
    NpuFusedMoEKernel,
    NpuQwen2VLRoPEKernel,
    NpuRMSNormKernel,
    NpuRoPEKernel,
    NpuSwiGLUKernel,
)
from engine.kernels.npu.versions import RELEASES, Requirement, parse
from engine.testing import tiny_models
from engine.testing.torch_npu_standin import calls

BF16 = torch.bfloat16
NPU_KERNELS = (NpuRMSNormKernel, NpuSwiGLUKernel, NpuRoPEKernel, NpuQwen2VLRoPEKernel, NpuFusedMoEKernel)


# ------------------------------------------------------------------------------------------- versions
@pytest.mark.parametrize(
    ("version", "release", "ok"),
    [
        ("2.6.0.post3+git1a2b3c4", "7.2.0", True),
        ("2.6.0.post2", "7.2.0", False),  # 7.1.0.2: no K-split grouped matmul
        ("2.5.1.post3", "7.2.0", False),  # the 2.5.1 line ended at 7.1.0.x
        ("2.7.1", "7.2.0", True),
        ("2.8.0", "7.2.0", True),  # a newer PyTorch line
        ("2.1.0.post17", "7.2.0", True),
        ("2.1.0.post16", "7.2.0", False),
        ("2.6.0.git1a2b3c4", "7.1.0", True),  # 7.1.0's x86 CXX11-ABI suffix
        ("2.6.0.git1a2b3c4", "7.2.0", False),
        ("2.5.1", "7.0.0", True),
        ("2.4.0.post2", "7.0.0", False),
        ("2.2.0", "7.0.0", False),  # the 2.2 line never got 7.0.0
        ("2.1.0", "5.0.0", True),
        ("2.0.1", "5.0.0", False),
    ],
)
def test_requirement_per_pytorch_line(version, release, ok):
    assert Requirement(release).satisfied_by(version) is ok
    assert (Requirement(release).problem(version) is None) is ok


def test_unreadable_version_is_a_reason_not_a_crash():
    assert parse("dev") is None
    assert "cannot read torch_npu version" in Requirement("7.2.0").problem("dev")
    assert "no __version__" in Requirement("7.2.0").problem(None)


def test_every_npu_kernel_declares_version_ops_and_dtypes():
    for kernel in NPU_KERNELS:
        assert kernel.min_torch_npu.release in RELEASES
        assert kernel.ops and set(kernel.ops) <= set(kernel.op_dtypes)
        assert all(combos for combos in kernel.op_dtypes.values())


def _reasons(model, spec):
    report = engine.plan(model, spec, device="npu")
    return {p.entry.name for p in report.patches}, {s.entry: s.reason for s in report.skipped}


def test_old_torch_npu_skips_entries_with_reasons(npu_standin):
    model = tiny_models.build("qwen3_moe")
    npu_standin.__version__ = "2.6.0.post2"  # release 7.1.0.2
    patched, skipped = _reasons(model, "qwen3_moe")
    assert patched == {"rms_norm", "swiglu", "rope", "rope_table", "sdpa_is_causal", "linear_cross_entropy"}
    assert "predates release 7.2.0" in skipped["fused_moe"] and "2.6.0.post3" in skipped["fused_moe"]
    npu_standin.__version__ = "2.4.0.post2"  # release 6.0.0
    patched, skipped = _reasons(model, "qwen3_moe")
    assert patched == {"rms_norm", "swiglu", "rope_table", "sdpa_is_causal", "linear_cross_entropy"}
    assert "release 7.0.0" in skipped["rope"]
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False):
        model(**tiny_models.sample_batch(model)).loss.backward()  # what remains patched still runs


def test_missing_ops_skip_or_reroute(npu_standin, monkeypatch):
    model = tiny_models.build("qwen3_moe", dtype=BF16)
    monkeypatch.delattr(npu_standin, "npu_swiglu")
    patched, skipped = _reasons(model, "qwen3_moe")
    assert "has no npu_swiglu" in skipped["swiglu"] and "has no npu_swiglu" in skipped["fused_moe"]
    monkeypatch.undo()
    monkeypatch.delattr(npu_standin, "npu_moe_token_unpermute")  # permute ops are optional: plain routing
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False) as handle:
        assert "fused_moe" in {p.entry for p in handle.report.patched}
        calls.clear()
        model(**tiny_models.sample_batch(model)).loss.backward()
        assert calls["npu_grouped_matmul"] and not calls["npu_moe_token_permute"]


# ------------------------------------------------------------------------------------------------ RoPE
def _cos_sin(batch, seq, dim, dtype=torch.float32, seed=0):
    angles = torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(seed)) * 3
    return angles.cos().to(dtype), angles.sin().to(dtype)


def test_rope_keeps_q_dtype_with_fp32_cos(npu_standin):
    q, k = torch.randn(2, 4, 5, 16).to(BF16), torch.randn(2, 2, 5, 16).to(BF16)
    cos, sin = _cos_sin(2, 5, 16)
    assert NpuRoPEKernel.supports(NoOptions(), q, k, cos, sin)
    calls.clear()
    q_out, k_out = NpuRoPEKernel.run(None, NoOptions(), q, k, cos, sin)
    assert calls["npu_rotary_mul"] == 2
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    for got, x in ((q_out, q), (k_out, k)):
        assert got.dtype == BF16  # computed in fp32 (like models that keep cos/sin fp32), cast back
        torch.testing.assert_close(got, (x.float() * c + rotate_half(x.float()) * s).to(BF16), rtol=0, atol=0)


def test_rope_partial_rotary_rotates_the_first_part(npu_standin):
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = _cos_sin(2, 5, 8)
    assert NpuRoPEKernel.supports(NoOptions(), q, k, cos, sin, 1)
    q_out, k_out = NpuRoPEKernel.run(None, NoOptions(), q, k, cos, sin, 1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    for got, x in ((q_out, q), (k_out, k)):  # transformers' partial-rotary models (phi, glm, ...)
        want = torch.cat((x[..., :8] * c + rotate_half(x[..., :8]) * s, x[..., 8:]), dim=-1)
        torch.testing.assert_close(got, want)


def test_rope_bsnd_layout(npu_standin):
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = _cos_sin(1, 5, 16)
    q_out, _ = NpuRoPEKernel.run(None, NoOptions(), q, k, cos, sin, 2)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    torch.testing.assert_close(q_out, q * c + rotate_half(q) * s)


@pytest.mark.parametrize(
    ("q_shape", "cos_shape", "unsqueeze_dim", "fits"),
    [
        ((1, 2, 3, 16), (1, 3, 10), 1, True),  # partial rotary, even width
        ((1, 2, 3, 1024), (1, 3, 1024), 1, False),  # rotary dim 1024 >= 896
        ((1, 2, 3, 1024), (1, 3, 128), 1, True),  # a wide head with a narrow rotary part is fine
        ((1, 2, 3, 16), (1, 3, 15), 1, False),  # odd rotary dim
        ((1, 2, 3, 16), (1, 3, 32), 1, False),  # cos wider than the head
        ((1, 2, 3, 16), (1, 3, 16), 0, False),  # unsupported unsqueeze dim
        ((1, 2, 3, 16), (1, 1, 16), 1, False),  # cos broadcast over the sequence
        ((1000, 2, 3, 16), (1, 3, 16), 1, False),  # batch >= 1000
    ],
)
def test_rope_declines_outside_the_op_constraints(npu_standin, q_shape, cos_shape, unsqueeze_dim, fits):
    q = torch.empty(q_shape)
    cos = torch.rand(cos_shape)
    assert NpuRoPEKernel.supports(NoOptions(), q, q, cos, cos, unsqueeze_dim) is fits


# -------------------------------------------------------------------------------------------- RMSNorm
def _norm(dtype, weight_dtype, offset=0.0):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32) * 0.1 + (0.0 if offset else 1.0))
    return norm.to(weight_dtype), torch.randn(3, 5, 32).to(dtype)


def test_rms_norm_gemma_casting_uses_fp32_gamma_pair(npu_standin):
    norm, x = _norm(BF16, torch.float32, offset=1.0)
    options = RMSNormOptions(weight_offset=1.0, casting="gemma")
    calls.clear()
    got = NpuRMSNormKernel.run(norm, options, x)
    assert calls["npu_rms_norm"] == 1 and got.dtype == BF16
    torch.testing.assert_close(got, reference(x, norm.weight, 1e-6, 1.0, "gemma"), rtol=0, atol=0)


def test_rms_norm_llama_casting_mixed_dtype_declines(npu_standin):
    norm, x = _norm(BF16, torch.float32)
    calls.clear()
    got = NpuRMSNormKernel.run(norm, RMSNormOptions(), x)
    assert not calls["npu_rms_norm"] and got.dtype == torch.float32  # transformers' w_f32 * normed.to(bf16)
    torch.testing.assert_close(got, norm(x), rtol=0, atol=0)


def test_rms_norm_same_dtype_uses_op(npu_standin):
    norm, x = _norm(BF16, BF16)
    calls.clear()
    got = NpuRMSNormKernel.run(norm, RMSNormOptions(), x)
    assert calls["npu_rms_norm"] == 1 and got.dtype == BF16
    torch.testing.assert_close(got, norm(x))  # one rounding instead of transformers' two
