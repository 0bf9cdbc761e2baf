import json

import pytest

import engine
from engine.cli import main
from engine.testing import tiny_models
from engine.training import apply_training_config


def test_training_yaml_use_v1_kernels_applies_all_available(tmp_path, npu_standin):
    config = tmp_path / "train.yaml"
    config.write_text("model: tiny\nuse_v1_kernels: true\nkernel_device: npu\nlearning_rate: 1.0e-5\n")
    model = tiny_models.build("qwen3_moe")
    handle = apply_training_config(model, config)
    assert handle is not None
    assert {p.entry for p in handle.report.patched} == {
        "rms_norm",
        "swiglu",
        "rope",
        "rope_table",
        "sdpa_is_causal",
        "linear_cross_entropy",
    }
    assert any(s.entry == "fused_moe" for s in handle.report.skipped)
    handle.revert()


def test_training_yaml_off_or_invalid(tmp_path):
    model = tiny_models.build("llama")
    assert apply_training_config(model, {"use_v1_kernels": False}) is None
    with pytest.raises(engine.SpecError, match="use_v1_kernels"):
        apply_training_config(model, {"use_v1_kernels": "maybe"})


def test_shipped_example_config_is_valid():
    from pathlib import Path

    from engine.training import read_training_options

    options = read_training_options(Path(__file__).resolve().parent.parent / "configs" / "train_qwen3.yaml")
    assert options.use_v1_kernels is True


def test_cli_validate_list_plan_schema(capsys, tmp_path):
    assert main(["validate"]) == 0
    assert "qwen3_moe" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: b\nmodel_types: [x]\nentries:\n  - name: e\n    kernel: nope\n    target: {module_class: X}\n"
    )
    assert main(["validate", str(bad)]) == 1
    assert "unknown kernel 'nope'" in capsys.readouterr().err
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "NpuFusedMoEKernel" in out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if " -> " in line}
    assert lines["vision_rope"].endswith("[manual]")  # manual by its kernel classes, not by the entry
    assert lines["fused_moe"].endswith("[manual]") and not lines["rms_norm"].endswith("]")  # by the entry; automatic
    assert main(["plan", "qwen3_moe", "--device", "npu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "npu" and any("torch_npu" in s["reason"] for s in data["skipped"])
    assert main(["schema", "--check"]) == 0


def test_cli_verify_with_standin(capsys):
    assert main(["verify", "qwen3", "--device", "npu", "--standin"]) == 0
    assert capsys.readouterr().out.startswith("PASS qwen3 on npu")


def test_cli_plan_from_config_on_meta_weights(tmp_path, capsys, npu_standin):
    tiny_models.build("qwen3_moe").config.save_pretrained(tmp_path)
    assert main(["plan", "--config", str(tmp_path), "--device", "npu", "--manual", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    entries = {"rms_norm", "swiglu", "rope", "rope_table", "fused_moe", "sdpa_is_causal", "linear_cross_entropy"}
    assert {p["entry"] for p in data["patched"]} == entries
