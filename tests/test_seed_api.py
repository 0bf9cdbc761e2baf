"""The seed's documented API (LLaMA-Factory v1 kernels) run as written, with the engine's import paths."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config, Qwen2Config

import engine
from engine import (
    DeviceType,
    KernelType,
    MetaKernel,
    NpuRMSNormKernel,
    NpuRoPEKernel,
    NpuSwiGluKernel,
    apply_available_kernels,
    apply_kernel,
    discover_kernels,
)
from engine.kernels.kinds import rms_norm as rms_norm_kind
from engine.patching import patched_call_of, patched_kernel_of
from engine.testing import tiny_models
from engine.testing.torch_npu_standin import torch_npu_standin

TINY = tiny_models.DENSE


def tiny_qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(**TINY)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.randn_like(param) * 0.1 + 1)
    return model


@pytest.fixture()
def accelerator(monkeypatch):
    """Mock ``torch.accelerator`` the way the seed's own tests do; returns a setter for the device type."""
    import engine.device

    monkeypatch.delenv("ENGINE_DEVICE", raising=False)
    current = {"type": None}

    def fake(check_available: bool = False):
        return None if current["type"] is None else SimpleNamespace(type=current["type"])

    monkeypatch.setattr(torch.accelerator, "current_accelerator", fake)
    # "no accelerator" must mean cpu on a GPU machine too: the per-backend probes find nothing either
    monkeypatch.setattr(engine.device, "npu_available", lambda: False)
    monkeypatch.setattr(engine.device, "_backend_available", lambda name: False)
    monkeypatch.setattr(engine.device, "_mps_available", lambda: False)
    monkeypatch.setattr(engine.device.torch.cuda, "is_available", lambda: False)
    return lambda device: current.__setitem__("type", device)


@pytest.fixture()
def on_npu(accelerator):
    accelerator("npu")
    with torch_npu_standin() as standin:
        yield standin
    accelerator(None)


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Eval-mode logits, then a training step's loss and every parameter's gradient."""
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    model.train().zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return logits, loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_documented_snippets_run_as_written(on_npu):
    from transformers.models.qwen2 import modeling_qwen2

    model = tiny_qwen2()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_loss, ref_grads = outputs(model, ids)

    # --- the snippet ---
    model = apply_available_kernels(model)  # every available kernel on the detected device

    model = apply_kernel(model, NpuRoPEKernel)  # or one kernel at a time
    model = apply_kernel(model, NpuRMSNormKernel)
    model = apply_kernel(model, NpuSwiGluKernel)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for kernel in discover_kernels(model):  # troubleshooting: what is registered and available here
            print(f"Kernel: {kernel.__name__}, Type: {kernel.type}, Device: {kernel.device}")
    # --- end of snippet ---

    norms = [m for m in model.modules() if type(m).__name__ == "Qwen2RMSNorm"]
    mlps = [m for m in model.modules() if type(m).__name__ == "Qwen2MLP"]
    assert len(norms) == 2 * 2 + 1 and len(mlps) == 2
    assert all(patched_kernel_of(patched_call_of(m)) is NpuRMSNormKernel for m in norms)
    assert all(patched_kernel_of(patched_call_of(m)) is NpuSwiGluKernel for m in mlps)
    assert patched_kernel_of(modeling_qwen2.apply_rotary_pos_emb) is NpuRoPEKernel

    logits, loss, grads = outputs(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    lines = printed.getvalue().splitlines()
    assert sorted(lines) == sorted(
        [
            "Kernel: NpuRMSNormKernel, Type: rmsnorm, Device: npu",
            "Kernel: NpuSwiGLUKernel, Type: swiglu, Device: npu",
            "Kernel: NpuRoPEKernel, Type: rope, Device: npu",
            "Kernel: NpuRopeTableKernel, Type: rope, Device: npu",
            "Kernel: NpuLinearCrossEntropyKernel, Type: linear_cross_entropy, Device: npu",
        ]
    )
    engine.revert(model)
    assert patched_kernel_of(modeling_qwen2.apply_rotary_pos_emb) is None
    assert all(patched_call_of(m) is None for m in norms + mlps)


def test_enums_and_documented_types():
    assert {t.name for t in KernelType} >= {"RMSNORM", "SWIGLU", "ROPE", "MOE"}
    assert {d.value for d in DeviceType} >= {"npu", "cuda", "xpu", "cpu"}
    assert NpuRMSNormKernel.type is KernelType.RMSNORM and f"{NpuRMSNormKernel.type}" == "rmsnorm"
    assert engine.NpuQwen2VLRoPEKernel.type is KernelType.ROPE  # the Qwen2-VL kernel is a ROPE kernel
    assert engine.NpuMoEFusedMoEKernel.type is KernelType.MOE
    assert NpuRMSNormKernel.device == "npu" and NpuRMSNormKernel.device is DeviceType.NPU


def test_discover_kernels_without_a_model_lists_this_devices_registered_kernels(accelerator):
    accelerator("npu")
    npu = discover_kernels()
    seed_kernels = {"NpuRMSNormKernel", "NpuSwiGLUKernel", "NpuRoPEKernel", "NpuFusedMoEKernel"}
    portable = {"NpuLinearCrossEntropyKernel", "NpuRopeTableKernel", "NpuSdpaIsCausalKernel"}
    assert {k.__name__ for k in npu} == seed_kernels | portable
    assert engine.NpuQwen2VLRoPEKernel not in npu  # auto_register = False: not registered
    accelerator(None)  # no accelerator: cpu, where only the portable kernels are registered
    assert [k.kind for k in discover_kernels()] == ["linear_cross_entropy", "rope_table", "sdpa_is_causal"]


def test_apply_kernel_of_another_device_is_a_value_error_naming_detected_device(accelerator):
    accelerator(None)
    model = tiny_qwen2()
    expected = r"NpuRMSNormKernel is a npu kernel but this process runs on cpu.*ENGINE_DEVICE"
    with pytest.raises(ValueError, match=expected):
        apply_kernel(model, NpuRMSNormKernel)
    with pytest.raises(engine.DeviceMismatchError):
        NpuRMSNormKernel.apply(model)
    assert not engine.handles(model)


@pytest.mark.parametrize("not_a_kernel", [torch.nn.Linear, "NpuRMSNormKernel", None, MetaKernel])
def test_apply_kernel_with_a_non_kernel_is_a_type_error(not_a_kernel, accelerator):
    with pytest.raises(TypeError, match="expects a kernel class"):
        apply_kernel(tiny_qwen2(), not_a_kernel)


def test_kernel_apply_is_apply_kernel(on_npu):
    model = tiny_qwen2()
    assert NpuRMSNormKernel.apply(model) is model
    report = engine.kernel_report(model)
    assert [p.kernel for p in report.patched] == ["NpuRMSNormKernel"] and report.device == "npu"
    engine.revert(model)


def test_family_without_spec_is_one_clear_message(on_npu, caplog):
    config = Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(engine.NoSpecError) as err:
        apply_kernel(model, NpuRMSNormKernel)
    message = str(err.value)
    assert "\n" not in message
    assert "'phi3'" in message and "ENGINE_KERNEL_SPECS" in message and "model_types" in message
    assert apply_available_kernels(model) is model  # not an error for the automatic path, but never silent
    assert "no spec declares model_type 'phi3'" in caplog.text


def test_user_metakernel_subclass_serves_every_entry_of_its_type_without_spec_edits(accelerator):
    calls = []

    class XpuRMSNormKernel(MetaKernel):
        type = KernelType.RMSNORM
        device = DeviceType.XPU

        @classmethod
        def tensor_devices(cls) -> frozenset[str]:
            return frozenset({"xpu", "cpu"})  # this machine has no XPU: let CPU tensors stand in

        @classmethod
        def run(cls, module, options, x):
            calls.append(type(module).__name__)
            return rms_norm_kind.reference(x, module.weight, module.variance_epsilon)

    try:
        accelerator("xpu")
        model = tiny_qwen2()
        ids = torch.randint(0, 128, (1, 5))
        want = model(input_ids=ids).logits
        assert XpuRMSNormKernel in discover_kernels()
        apply_available_kernels(model)
        assert [p.kernel for p in engine.kernel_report(model).patched if p.entry == "rms_norm"] == ["XpuRMSNormKernel"]
        got = model(input_ids=ids).logits
        assert len(calls) == 2 * 2 + 1 and set(calls) == {"Qwen2RMSNorm"}
        torch.testing.assert_close(got, want)
        engine.revert(model)
    finally:
        engine.REGISTRY.remove(XpuRMSNormKernel)
