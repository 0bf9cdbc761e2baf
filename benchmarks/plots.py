"""Plots rendered from the benchmark JSON files, so they can be redrawn without a GPU:

python -m benchmarks.plots benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import bar_plot


def plot_kernels(payload: dict[str, Any], path: Path) -> None:
    groups: dict[str, dict[str, float]] = {}
    for row in payload["records"]:
        mode = "fwd+bwd" if "fwd_bwd_ms" in row else "fwd"
        groups.setdefault(f"{row['case']}\n{mode}", {})[row["provider"]] = row.get("fwd_bwd_ms", row["fwd_ms"])
        if row.get("graph_ms"):
            groups.setdefault(f"{row['case']}\n{mode}, CUDA graph", {})[row["provider"]] = row["graph_ms"]
    gpu = payload["environment"].get("gpu", "GPU")
    bar_plot(
        path, f"kernels on {gpu} (bf16), eager launches and CUDA-graph replay; lower is better", groups, "ms", log=True
    )


def plot_moe(payload: dict[str, Any], path: Path) -> None:
    groups: dict[str, dict[str, float]] = {}
    for row in payload["records"]:
        groups.setdefault(f"T={row['tokens']} fwd+bwd", {})[row["provider"]] = row["fwd_bwd_ms"]
        groups.setdefault(f"T={row['tokens']} fwd", {})[row["provider"]] = row["fwd_ms"]
    gpu = payload["environment"].get("gpu", "GPU")
    bar_plot(path, f"Qwen3-30B-A3B experts on {gpu} (bf16), lower is better", groups, "ms", log=True)


def plot_train(payload: dict[str, Any], path: Path) -> None:
    groups: dict[str, dict[str, float]] = {}
    for name, entry in payload["summary"].items():
        for variant, row in entry.items():
            if variant == "time_ratios" or "ms" not in row:
                continue
            groups.setdefault(f"{name}\nms/step", {})[variant] = row["ms"]
            groups.setdefault(f"{name}\npeak GiB", {})[variant] = row["peak_gib"]
    gpu = payload["environment"].get("gpu", "GPU")
    bar_plot(path, f"training step (AdamW, bf16) on {gpu}; lower is better", groups, "ms / GiB")


def plot_lce(payload: dict[str, Any], path: Path) -> None:
    from benchmarks.bench_lce import plot_op

    plot_op(payload, path)


PLOTTERS = {"kernels": plot_kernels, "moe": plot_moe, "train": plot_train, "lce": plot_lce}


def main(paths: list[str]) -> None:
    for name in paths:
        path = Path(name)
        kind = path.stem.split("_", 1)[0]
        PLOTTERS[kind](json.loads(path.read_text()), path.with_suffix(".png"))


if __name__ == "__main__":
    main(sys.argv[1:])
