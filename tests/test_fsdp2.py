"""FSDP2 with patches applied before and after ``fully_shard``: a 2-rank gloo run on CPU (NPU stand-in)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "distributed" / "fsdp2_parity.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("deterministic", [False, True])
def test_fsdp2_patch_before_and_after_sharding_match_unpatched(tmp_path, deterministic):
    out = tmp_path / "fsdp2.json"
    path = os.pathsep.join(filter(None, [str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), str(SCRIPT), "--device", "cpu", "--steps", "4", "--out", str(out),
        *(["--deterministic"] if deterministic else []),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if not out.exists():
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    base = result["unpatched"]["losses"]
    assert len(base) == 4 and base[-1] < base[0]
    for variant in ("patch_before_shard", "patch_after_shard"):
        for got, want in zip(result[variant]["losses"], base, strict=True):
            assert abs(got - want) <= 1e-5 * abs(want), (variant, result[variant]["losses"], base)
    assert "DTensor" in result["patch_after_shard"]["report"]  # probed on simulated weights, and said so
    assert result["deterministic"] is deterministic
    if deterministic:  # the repeated unpatched run reproduces the first exactly
        assert result["unpatched_repeat"]["losses"] == base
        assert result["max_relative_loss_gap"]["unpatched_repeat"] == 0.0
