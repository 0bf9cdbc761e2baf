"""Where one training step spends its GPU time, by kernel category, for ``bench_train``'s variants.

    python -m benchmarks.profile_train --model qwen3_0.6b --variants transformers+compile engine+compile

Each variant builds the model as ``bench_train`` does, runs 3 warm-up steps (compilation included), times 8
steps on the host, then profiles one step's CUDA kernels (``torch.profiler``) and sums their time per category:
GEMMs (cuBLAS/CUTLASS), attention (flash/cuDNN SDPA), Inductor's generated kernels, the engine's Triton kernels,
the optimizer's multi-tensor kernels, the rest. This is how session 6 found that a compiled step's attention was
2.9x slower than the eager one's (a materialised causal mask), the gap ``sdpa_is_causal`` closes.
Writes profile_<gpu>_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_train import VARIANTS, prepare
from benchmarks.common import RESULTS_DIR, environment, write_json
from benchmarks.models import vocab_of

GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "wgmma")


def category(kernel: str) -> str:
    name = kernel.lower()
    if "multi_tensor" in name or "adam" in name:
        return "optimizer"
    if "flash" in name or "fmha" in name or "sdpa" in name or "attention" in name:
        return "attention"
    if kernel.startswith("_"):  # the engine's Triton kernels are private functions (_rms_norm_fwd, _row_gemm, ...)
        return "engine"
    if any(marker in name for marker in GEMM_MARKERS):
        return "gemm"
    if name.startswith("triton_"):
        return "inductor"
    return "other"


def profile_variant(
    model_name: str, variant: str, batch: int, seq: int, lce_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    torch.manual_seed(0)
    model, _ = prepare(model_name, variant, lce_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, vocab_of(model_name), (batch, seq), device="cuda")

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    wall = []
    for _ in range(8):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_category: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        ms = event.device_time_total / 1e3
        if ms > 0:
            per_category[category(event.key)] += ms
            kernels.append({"kernel": event.key[:160], "ms": ms, "calls": event.count})
    kernels.sort(key=lambda k: -k["ms"])
    return {
        "wall_ms_sorted": sorted(wall),
        "gpu_ms": sum(per_category.values()),
        "gpu_ms_by_category": dict(sorted(per_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": kernels[:40],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3_0.6b")
    parser.add_argument("--variants", nargs="+", default=["transformers+compile", "engine+compile"], choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--lce-options", type=json.loads, default={}, help="as bench_train's --lce-options")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    results = {}
    for variant in args.variants:
        row = profile_variant(args.model, variant, args.batch, args.seq, args.lce_options)
        results[variant] = row
        by_category = ", ".join(f"{k} {v:.1f}" for k, v in row["gpu_ms_by_category"].items())
        print(f"{args.model} {variant}: GPU {row['gpu_ms']:.1f} ms ({by_category})")
        for kernel in row["top_kernels"][:8]:
            print(f"    {kernel['ms']:8.2f} ms {kernel['calls']:5d}  {kernel['kernel'][:100]}")
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    payload = {"environment": environment(), "model": args.model, "batch": args.batch, "seq": args.seq}
    payload["lce_options"] = args.lce_options
    write_json(args.out / f"profile_{gpu}_{args.model}.json", {**payload, "variants": results})


if __name__ == "__main__":
    main()
