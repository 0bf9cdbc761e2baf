"""On an Ascend NPU only: the real torch_npu ops against the stand-in's beliefs, then the kernels on the device.

Everything else in the suite checks the NPU kernels against ``engine/testing/torch_npu_standin.py``; this file
checks that stand-in against the hardware. Skipped without torch_npu and an NPU. On a new machine or torch_npu
build run it first: ``pytest tests/test_npu_hardware.py -v``.
"""

import pytest
import torch

from engine.device import npu_available
from engine.testing import torch_npu_standin as standin

pytestmark = pytest.mark.skipif(not npu_available(), reason="needs an Ascend NPU with torch_npu")
BF16 = torch.bfloat16
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, BF16: 1.6e-2}  # relative norm error


def _real():
    import torch_npu

    return torch_npu


def _assert_matches(real: torch.Tensor, believed: torch.Tensor, what: str) -> None:
    """The device result against the stand-in's CPU result: same shape and dtype, values within rounding."""
    real = real.cpu()
    assert real.shape == believed.shape and real.dtype == believed.dtype, what
    err = float((real.double() - believed.double()).norm() / believed.double().norm().clamp_min(1e-30))
    assert err <= TOLERANCE[believed.dtype], f"{what}: relative error {err:.2e}"


def test_permute_indices_convention_and_unpermute():
    tokens = torch.tensor([[1, 1, 1], [2, 2, 2], [3, 3, 3], [0, 0, 0]]).to(BF16)
    indices = torch.tensor([[0, 4], [4, 3], [4, 2], [1, 1]])
    permuted, sorted_indices = _real().npu_moe_token_permute(tokens.npu(), indices.npu(), indices.numel())
    assert sorted_indices.dtype == torch.int32
    assert sorted_indices.cpu().tolist() == [0, 5, 6, 4, 7, 3, 1, 2]  # argsort(argsort(flat))
    assert permuted[:, 0].cpu().tolist() == [1, 0, 0, 3, 2, 1, 2, 3]
    probs = (torch.ones(4, 2) / 2).to(BF16)
    back = _real().npu_moe_token_unpermute(permuted, sorted_indices, probs=probs.npu())
    assert torch.equal(back.cpu(), tokens)


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
def test_grouped_matmul_calls_of_the_moe_kernel(dtype):
    """The three calls GroupedLinear makes (weights as views, an empty group, counts as group_list)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen).to(dtype)
    weight = torch.randn(4, 32, 64, generator=gen).to(dtype)  # transformers' [E, out, in]
    dy = torch.randn(40, 32, generator=gen).to(dtype)
    counts = torch.tensor([10, 0, 18, 12])
    on_cpu = {"x": x, "weight": weight, "dy": dy, "counts": counts}
    on_npu = {k: v.npu() for k, v in on_cpu.items()}
    cases = {  # name: (x list, weight list, group_type, split_item), built from one tensor set
        "forward": (lambda t: [t["x"]], lambda t: [t["weight"].transpose(1, 2)], 0, 2),
        "dgrad": (lambda t: [t["dy"]], lambda t: [t["weight"]], 0, 2),
        "wgrad (K split)": (lambda t: [t["dy"].t()], lambda t: [t["x"]], 2, 3),
    }
    with torch.no_grad():
        for name, (xs, ws, group_type, split_item) in cases.items():
            real, believed = (
                op(
                    xs(t),
                    ws(t),
                    group_list=t["counts"],
                    split_item=split_item,
                    group_type=group_type,
                    group_list_type=1,
                )[0]
                for op, t in ((_real().npu_grouped_matmul, on_npu), (standin.npu_grouped_matmul, on_cpu))
            )
            _assert_matches(real, believed, name)


def test_rotary_mul_on_strided_q_mixed_dtype_and_partial_slice():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 128, generator=gen).to(BF16).npu().transpose(1, 2)  # BNSD view of BSND storage
    angles = torch.randn(2, 1, 7, 128, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    npu = _real()
    with torch.no_grad():
        real = npu.npu_rotary_mul(q, cos.npu(), sin.npu())  # fp32 r1/r2 with bf16 x
        _assert_matches(real, standin.npu_rotary_mul(q.cpu(), cos, sin), "mixed dtype, strided x")
        part = q[..., :64]
        real = npu.npu_rotary_mul(part, cos[..., :64].npu().to(BF16), sin[..., :64].npu().to(BF16))
        _assert_matches(
            real, standin.npu_rotary_mul(part.cpu(), cos[..., :64].to(BF16), sin[..., :64].to(BF16)), "slice"
        )


def test_rms_norm_mixed_dtype_and_backward_dtypes():
    x = torch.randn(8, 256).to(BF16)
    gamma = torch.randn(256)
    npu = _real()
    y, rstd = npu.npu_rms_norm(x.npu(), gamma.npu(), epsilon=1e-6)
    want_y, want_rstd = standin.npu_rms_norm(x, gamma, 1e-6)
    _assert_matches(y, want_y, "y")
    _assert_matches(rstd, want_rstd, "rstd")
    xs, gs = x.npu().requires_grad_(), gamma.npu().requires_grad_()
    npu.npu_rms_norm(xs, gs)[0].float().pow(2).sum().backward()
    assert xs.grad.dtype == BF16 and gs.grad.dtype == torch.float32


def test_swiglu_activates_the_first_half():
    x = torch.randn(6, 64).to(BF16)
    _assert_matches(_real().npu_swiglu(x.npu(), dim=-1), standin.npu_swiglu(x, -1), "npu_swiglu")


def test_fused_moe_kernel_trains_every_weight_on_device(monkeypatch):
    import engine
    from engine.testing import tiny_models

    monkeypatch.setenv("ENGINE_DEVICE", "npu")
    model = tiny_models.build("qwen3_moe", dtype=BF16).npu()
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=gen).to(BF16).npu().requires_grad_()
    idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(64)]).npu()
    w = torch.rand(64, 2, generator=gen).to(BF16).npu().requires_grad_()

    def run():
        experts.zero_grad(set_to_none=True)
        x.grad = w.grad = None
        out = experts(x, idx, w)
        out.float().pow(2).sum().backward()
        return [
            t.detach().float().cpu() for t in (out, x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
        ]

    want = run()
    with engine.apply(model, spec="qwen3_moe", device="npu", verbose=False) as handle:
        assert "fused_moe" in {p.entry for p in handle.report.patched}, handle.report.summary()
        got = run()
    for name, g, ref in zip(("out", "hidden", "routing weights", "gate_up", "down"), got, want, strict=True):
        err = float((g - ref).norm() / ref.norm())
        assert err <= 3e-2, f"{name}: relative error {err:.2e} against transformers' own bf16"


def test_verify_qwen3_moe_on_device(monkeypatch):
    from engine.verify import verify_family

    monkeypatch.setenv("ENGINE_DEVICE", "npu")
    result = verify_family("qwen3_moe", "npu")
    assert result.ok, result.summary()
