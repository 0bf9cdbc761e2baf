#!/usr/bin/env bash
# Builds the wheel, installs it into a fresh venv in a temp dir outside the checkout, and from there runs
# `engine list`, `engine schema --check` and an apply on a tiny random-init llama (Triton interpreter).
# The fresh venv sees the current venv's packages (torch, transformers, ...) through a .pth line, so nothing is
# downloaded; engine itself comes only from the wheel (the current venv's editable hook is not a site dir there).
# Usage: .ci/wheel_smoke.sh   (run with the venv that has the dependencies active)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Build from a copy of the working tree (tracked and untracked, not ignored): an in-tree build would leave a
# build/ folder whose stale files later wheels would pick up.
mkdir "$tmp/src"
git -C "$repo" ls-files -z -co --exclude-standard |
    (cd "$repo" && xargs -0 -r sh -c 'for f; do [ -f "$f" ] && cp --parents "$f" "$0"; done' "$tmp/src")
python -m pip wheel -q --no-deps --no-build-isolation "$tmp/src" -w "$tmp/dist"
python -m venv "$tmp/venv"
deps="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
fresh="$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$deps" > "$fresh/ci-deps.pth"
"$tmp/venv/bin/python" -m pip install -q --no-deps "$tmp"/dist/engine-*.whl

cd "$tmp"   # outside the checkout: `engine` can only come from the wheel
export ENGINE_DEVICE=cuda TRITON_INTERPRET=1
"$tmp/venv/bin/engine" list
"$tmp/venv/bin/engine" schema --check
"$tmp/venv/bin/python" - <<'PY'
from pathlib import Path

import engine
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

assert "site-packages" in engine.__file__, engine.__file__
shipped = Path(engine.__file__).parent
assert (shipped / "schemas" / "kernel_spec.schema.json").is_file()
assert {"llama", "qwen3", "qwen3_moe", "qwen2_vl"} <= set(engine.load_catalog())
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = AutoModelForCausalLM.from_config(config)
engine.apply_available_kernels(model, verbose=False)
report = engine.kernel_report(model)
assert {p.entry for p in report.patched} >= {"rms_norm", "swiglu", "rope"}, report.summary()
ids = torch.randint(0, 64, (1, 8))
model(input_ids=ids, labels=ids).loss.backward()
engine.revert(model)
print(f"wheel ok: {engine.__file__}; patched {sorted(p.entry for p in report.patched)}")
PY
