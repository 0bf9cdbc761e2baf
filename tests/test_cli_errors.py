"""CLI: a user error is one line on stderr and a non-zero exit, never a traceback (``--debug`` shows one)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.device import torch_npu_installed
from engine.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
GOOD = "name: mine\nmodel_types: [llama]\nentries:\n  - name: norm\n    kernel: rms_norm\n"
GOOD += "    target: {module_class: LlamaRMSNorm}\n"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own exit for bad arguments
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["validate", "missing.yaml"], "missing.yaml"),
        (["plan", "--device", "garbage"], "unsupported device 'garbage'"),
        (["plan", "--spec", "nosuch"], "no spec named 'nosuch'"),
        (["plan", "--config", "/nonexistent"], "/nonexistent: no such folder"),
        (["plan", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["verify", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["verify", "qwen3", "--dtype", "int3"], "invalid choice"),
        (["plan", "--spec-dir", "/nonexistent/specs"], "spec folder does not exist"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_without_traceback(capsys, argv, fragment):
    code, _, err = _run(capsys, *argv)
    assert code not in (0, None)
    assert fragment in _one_error_line(err)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(SpecError, match="no spec named 'nosuch'"):
        main(["--debug", "plan", "--spec", "nosuch"])
    with pytest.raises(SpecError):
        main(["plan", "--spec", "nosuch", "--debug"])


def test_bad_verbosity_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("ENGINE_VERBOSITY", "garbage")
    code, out, err = _run(capsys, "list")
    assert code == 1 and not out
    assert "ENGINE_VERBOSITY='garbage'" in _one_error_line(err)


def test_validate_reports_every_file_then_fails(capsys, tmp_path):
    (tmp_path / "a_good.yaml").write_text(GOOD)
    (tmp_path / "b_bad.yaml").write_text(GOOD.replace("rms_norm\n", "nope\n", 1).replace("name: mine", "name: b"))
    (tmp_path / "c_bad.toml").write_text("name = [")
    (tmp_path / "d_good.yaml.j2").write_text(GOOD.replace("mine", "{{ 'mine2' }}"))
    code, out, err = _run(capsys, "validate", str(tmp_path))
    assert code == 1
    assert "a_good.yaml: mine" in out and "d_good.yaml.j2: mine2" in out
    fails = [line for line in err.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and "b_bad.yaml" in fails[0] and "c_bad.toml" in fails[1]
    assert "2 of 4" in err and "Traceback" not in err


def test_validate_empty_folder_warns_and_fails(capsys, tmp_path):
    code, out, err = _run(capsys, "validate", str(tmp_path))
    assert code == 1 and not out
    assert "warning" in _one_error_line(err) and str(tmp_path) in err


def test_list_shows_what_loads_and_reports_the_bad_file(capsys, tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text("name: bad\nmodel_types: [x]\nentries: [{{")
    code, out, err = _run(capsys, "list", "--spec-dir", str(tmp_path))
    assert code == 1
    assert "mine (llama)" in out and "qwen3_moe" in out
    assert "bad.yaml" in _one_error_line(err)


@pytest.mark.skipif(torch_npu_installed(), reason="torch_npu is installed here")
def test_verify_npu_without_torch_npu_gives_the_reason(capsys, monkeypatch):
    monkeypatch.delenv("ENGINE_DEVICE", raising=False)
    code, out, err = _run(capsys, "verify", "qwen3", "--device", "npu")
    assert code == 1 and "PASS" not in out
    line = _one_error_line(err)
    assert "torch_npu is not installed" in line and "--standin" in line


def test_allow_module_flag_opts_in(capsys, tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "name: mine\nmodel_types: [llama]\nentries:\n"
        "  - {name: rope, kernel: rope, target: {function: my_models.rope.apply}}\n"
    )
    assert _run(capsys, "validate", str(tmp_path))[0] == 1
    code, out, _ = _run(capsys, "validate", str(tmp_path), "--allow-module", "my_models")
    assert code == 0 and "mine.yaml: mine" in out


def test_entry_point_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "plan", "--spec", "nosuch"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        timeout=120,
    )
    assert done.returncode == 1 and not done.stdout
    assert _one_error_line(done.stderr).startswith("engine: error: no spec named 'nosuch'")
