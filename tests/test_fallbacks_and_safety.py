"""Bad input, missing runtimes, wrong declarations, runtime fallback, conflicts and revert."""

import sys

import pytest
import torch
from torch import nn

import engine
from engine import patching as patch_module
from engine.errors import EngineError, KernelUnavailableError
from engine.spec import KernelSpec
from engine.testing import tiny_models
from engine.testing.torch_npu_standin import calls
from tests.parity import patched_forward_names


def _spec(*entries: dict) -> KernelSpec:
    return KernelSpec.model_validate({"name": "custom", "model_types": ["llama"], "entries": list(entries)})


def test_missing_torch_npu_skips_with_reason_and_apply_kernel_raises(monkeypatch):
    monkeypatch.setenv("ENGINE_DEVICE", "npu")
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    import engine.device as device

    monkeypatch.setattr(device, "torch_npu_installed", lambda: False)
    monkeypatch.setattr("engine.kernels.npu.base.torch_npu_installed", lambda: False)
    model = tiny_models.build("llama")
    handle = engine.apply(model, spec="llama", device="npu", verbose=False)
    assert not handle.report.patched
    # every entry with an NPU kernel says torch_npu is missing; the embedding has no NPU kernel at all
    reasons = {s.entry: s.reason for s in handle.report.skipped}
    assert reasons.pop("embedding") == "no 'embedding' kernel for device 'npu' (kernels exist for: cuda)"
    assert reasons and all("torch_npu is not installed" in reason for reason in reasons.values())
    with pytest.raises(KernelUnavailableError, match="torch_npu is not installed"):
        engine.apply_kernel(model, engine.NpuRMSNormKernel)


def test_missing_triton_skips_with_reason(monkeypatch):
    monkeypatch.setattr("engine.kernels.triton.runtime.triton_installed", lambda: False)
    model = tiny_models.build("qwen3")
    report = engine.plan(model, device="cuda")
    # every Triton entry is skipped with the reason; the table op and the mask decision are plain PyTorch
    assert [p.entry.name for p in report.patches] == ["rope_table", "sdpa_is_causal"]
    assert len(report.skipped) == 5 and all("triton is not installed" in s.reason for s in report.skipped)


def test_cpu_and_xpu_keep_original_forward_and_say_why():
    model = tiny_models.build("llama")
    for device in ("cpu", "xpu"):
        report = engine.plan(model, device=device)
        # only the portable kernels (rope table, mask decision, fused linear cross-entropy) serve these devices
        assert [p.entry.name for p in report.patches] == ["rope_table", "sdpa_is_causal", "linear_cross_entropy"]
        assert len(report.skipped) == 4
        assert all(f"kernel for device {device!r}" in s.reason for s in report.skipped)


def test_unknown_model_type_is_reported(monkeypatch):
    monkeypatch.setenv("ENGINE_DEVICE", "cuda")
    model = nn.Sequential(nn.Linear(2, 2))
    report = engine.plan(model, device="cuda")
    assert "no spec declares model_type 'Sequential'" in report.skipped[0].reason
    with pytest.raises(EngineError, match="no spec declares"):
        engine.apply_kernel(model, engine.TritonRMSNormKernel)


def test_unsupported_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported device 'tpu'"):
        engine.apply(tiny_models.build("llama"), device="tpu")


def test_probe_rejects_one_plus_w_norm_declared_plain(npu_standin):
    class OnePlusNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.eps = 1e-6

        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)).to(x.dtype)

    model = nn.Sequential(OnePlusNorm())
    plain = _spec({"name": "n", "kernel": "rms_norm", "target": {"module_class": "OnePlusNorm"}})
    report = engine.plan(model, plain, device="npu")
    assert not report.patches and "disagree" in report.skipped[0].reason
    declared = _spec(
        {
            "name": "n",
            "kernel": "rms_norm",
            "target": {"module_class": "OnePlusNorm"},
            "options": {"weight_offset": 1.0, "casting": "gemma"},
        }
    )
    with engine.apply(model, declared, device="npu", verbose=False) as handle:
        assert handle.report.patched
        x = torch.randn(3, 8)
        torch.testing.assert_close(model(x), OnePlusNorm.forward(model[0], x))


def test_swiglu_refused_for_non_silu_activation(npu_standin):
    model = tiny_models.build("llama")
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.GELU()
    spec = _spec({"name": "mlp", "kernel": "swiglu", "target": {"module_class": "LlamaMLP"}})
    report = engine.plan(model, spec, device="npu")
    assert not report.patches and "not SiLU" in report.skipped[0].reason


def test_config_condition_skips_entry():
    model = tiny_models.build("llama")
    model.config.hidden_act = "gelu"
    report = engine.plan(model, "llama", device="cuda")
    reason = next(s.reason for s in report.skipped if s.entry == "swiglu")
    assert "config.hidden_act is 'gelu'" in reason


def test_transformers_range_and_missing_function_are_reported():
    model = tiny_models.build("llama")
    spec = _spec(
        {
            "name": "old",
            "kernel": "rms_norm",
            "target": {"module_class": "LlamaRMSNorm"},
            "transformers": "<5",
        },
        {
            "name": "gone",
            "kernel": "rope",
            "target": {"function": "transformers.models.llama.modeling_llama.nope"},
        },
        {"name": "absent", "kernel": "rms_norm", "target": {"module_class": "NoSuchNorm"}},
    )
    reasons = {s.entry: s.reason for s in engine.plan(model, spec, device="cuda").skipped}
    assert "outside <5" in reasons["old"]
    assert "has no attribute 'nope'" in reasons["gone"]
    assert "no NoSuchNorm modules" in reasons["absent"]


def test_runtime_falls_back_to_original_off_device(npu_standin):
    """A model patched for NPU whose tensors are elsewhere runs the original code (stand-in marks cpu ok)."""
    model = tiny_models.build("llama")
    batch = tiny_models.sample_batch(model)
    ref = model(**batch).loss
    npu_standin.__engine_standin__ = False  # now the NPU kernels no longer claim CPU tensors
    with engine.apply(model, spec="llama", device="npu", verbose=False):
        calls.clear()
        out = model(**batch).loss
        assert not calls, "NPU ops ran on CPU tensors"
    assert torch.equal(out, ref)


def test_double_apply_skips_already_patched_and_revert_order(npu_standin):
    model = tiny_models.build("llama")
    first = engine.apply(model, spec="llama", device="npu", verbose=False)
    second = engine.apply(model, spec="llama", device="npu", verbose=False)
    assert not [p for p in second.report.patched if p.entry == "rms_norm"]
    assert any("already patched" in s.reason for s in second.report.skipped)
    rope_items = [p for p in second.report.patched if p.entry == "rope"]
    assert rope_items and rope_items[0].scope == "process-wide function"  # shared, reference-counted
    from transformers.models.llama import modeling_llama

    first.revert()
    assert patch_module.patched_kernel_of(modeling_llama.apply_rotary_pos_emb) is engine.NpuRoPEKernel
    second.revert()
    assert patch_module.patched_kernel_of(modeling_llama.apply_rotary_pos_emb) is None
    assert not patched_forward_names(model)


def test_patch_is_per_instance(npu_standin):
    a, b = tiny_models.build("qwen3"), tiny_models.build("qwen3")
    with engine.apply(a, spec="qwen3", device="npu", verbose=False):
        assert patched_forward_names(a) and not patched_forward_names(b)


def test_conflicting_replacement_is_not_clobbered(npu_standin, caplog):
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    model = tiny_models.build("llama")
    handle = engine.apply(model, spec="llama", device="npu", verbose=False)

    def someone_elses(*args, **kwargs):
        return original(*args, **kwargs)

    modeling_llama.apply_rotary_pos_emb = someone_elses
    try:
        handle.revert()
        assert modeling_llama.apply_rotary_pos_emb is someone_elses
        assert "replaced after the engine patched it" in caplog.text
    finally:
        modeling_llama.apply_rotary_pos_emb = original


def test_failed_install_rolls_back(npu_standin, monkeypatch):
    model = tiny_models.build("llama")
    real = patch_module.acquire_function_patch

    def boom(*args, **kwargs):
        raise RuntimeError("install failed")

    monkeypatch.setattr(patch_module, "acquire_function_patch", boom)
    with pytest.raises(RuntimeError, match="install failed"):
        engine.apply(model, spec="llama", device="npu", verbose=False)
    monkeypatch.setattr(patch_module, "acquire_function_patch", real)
    assert not patched_forward_names(model)


def test_report_goes_to_stderr_without_logging_config(npu_standin, capsys, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # an application that configured no logging
    model = tiny_models.build("llama")
    engine.apply(model, spec="llama", device="npu").revert()
    err = capsys.readouterr().err
    assert "engine: llama on npu" in err and "patched  llama/rms_norm" in err
    monkeypatch.setenv("ENGINE_VERBOSITY", "warning")
    engine.apply(model, spec="llama", device="npu").revert()
    assert "engine: llama" not in capsys.readouterr().err


def test_report_goes_through_logging_when_configured(npu_standin, caplog, capsys):
    with caplog.at_level("INFO", logger="engine"):
        engine.apply(tiny_models.build("llama"), spec="llama", device="npu").revert()
    assert any("patched  llama/rms_norm" in r.getMessage() for r in caplog.records)
    assert "engine: llama" not in capsys.readouterr().err
