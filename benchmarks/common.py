"""Timing, result files and plots shared by the benchmark scripts (run on a GPU, not in CI)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], Any], warmup_ms: int = 100, rep_ms: int = 500) -> float:
    """Median of CUDA-event timings (triton.testing.do_bench flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def fwd_bwd(fn: Callable[[], Any], leaves: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A closure running forward then backward with fixed upstream gradients, clearing input grads."""

    def run() -> None:
        for t in leaves:
            t.grad = None
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads)

    return run


def environment() -> dict[str, Any]:
    import transformers
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = None
    return env


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def bar_plot(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str, log: bool = False) -> None:
    """One group of bars per case (e.g. an op and mode), one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = sorted({p for values in groups.values() for p in values})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5.2))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs = [g + i * width for g in range(len(groups))]
        ys = [values.get(provider, 0.0) for values in groups.values()]
        bars = ax.bar(xs, ys, width, label=provider)
        ax.bar_label(bars, labels=[f"{y:.2f}" if y else "" for y in ys], fontsize=6, rotation=90, padding=2)
    ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=7, rotation=20, ha="right")
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")
