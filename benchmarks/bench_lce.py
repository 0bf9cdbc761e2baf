"""Fused linear cross-entropy (issue 9): training steps, a sequence-length sweep, and the head + loss alone.

    python -m benchmarks.bench_lce                          # all three parts
    python -m benchmarks.bench_lce --parts op --chunk-mib 128 256 512 1024
    python -m benchmarks.bench_lce --replot benchmarks/results/lce_<gpu>.json

train  B4 x T2048, bf16 parameters, AdamW, random-init Qwen3-0.6B, Qwen2.5-0.5B and 4-layer Qwen3-MoE (30B-A3B
       layer) shapes; variants: transformers, engine without linear_cross_entropy, engine with it, Liger-Kernel
       (RMSNorm, SwiGLU, RoPE, fused linear CE; skipped when not installed). ms/step (median), tokens/s, peak
       memory, first-step loss (same seed and data for every variant).
sweep  Qwen3-0.6B at B1 x T in 2048, 8192, 32768: the same variants; tokens/s and peak memory, OOM recorded.
op     the head and loss alone, fwd+bwd, N=8192 rows (and N=32768 at H=1024), V=151936: transformers' math
       (bf16 logits, fp32 upcast, cross_entropy), the engine op with the Triton chunk loss at each --chunk-mib,
       the engine op with the portable torch chunk loss, Liger's fused linear CE; ms (CUDA events), extra peak
       memory, loss and gradient error against transformers' math.

Every training run is a subprocess of its own: Liger patches transformers classes process-wide, and the peak
memory of each run starts from an empty allocator. Writes lce_<gpu>.json and lce_<gpu>.png into --out; parts
not rerun are kept from an earlier lce_<gpu>.json there, so the parts can run as separate invocations.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, environment, median_ms, write_json

MODELS = ["qwen3_0.6b", "qwen2.5_0.5b", "qwen3_moe_4l"]
VARIANTS = ["transformers", "engine", "engine+lce", "liger"]
SWEEP_SEQS = [2048, 8192, 32768]
VOCAB = 151936


# ---------------------------------------------------------------------------------------------- training runs
def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def _engine_spec(name: str, with_lce: bool, chunk_mib: int | None) -> Any:
    from benchmarks.models import SPECS
    from engine.catalog import find_spec
    from engine.spec import KernelSpec

    raw = find_spec(SPECS[name]).model_dump(exclude={"source"})
    entries = []
    for entry in raw["entries"]:
        if entry["kernel"] == "linear_cross_entropy":
            if not with_lce:
                continue
            if chunk_mib:
                entry["options"] = {**entry["options"], "chunk_mib": chunk_mib}
        entries.append(entry)
    return KernelSpec.model_validate({**raw, "entries": entries})


def apply_variant(model: torch.nn.Module, name: str, variant: str, chunk_mib: int | None) -> Any:
    if variant in ("engine", "engine+lce"):
        import engine

        handle = engine.apply(model, _engine_spec(name, variant == "engine+lce", chunk_mib), device="cuda")
        return handle.report.to_dict()
    if variant == "liger":
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    return None


def train_run(name: str, variant: str, batch: int, seq: int, steps: int, warmup: int, chunk_mib: int | None) -> dict:
    """One model, one variant, in this process: ms/step, tokens/s, peak memory, losses (or ``oom``)."""
    from benchmarks.models import build_model as build

    record: dict[str, Any] = {"model": name, "variant": variant, "batch": batch, "seq": seq}
    torch.cuda.reset_peak_memory_stats()
    try:
        model = build(name)
        record["patch_report"] = apply_variant(model, name, variant, chunk_mib)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        gen = torch.Generator(device="cuda").manual_seed(0)
        data = [torch.randint(0, VOCAB, (batch, seq), device="cuda", generator=gen) for _ in range(4)]
        times, losses = [], []
        for step in range(warmup + steps):
            ids = data[step % len(data)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
            losses.append(float(loss))
    except torch.OutOfMemoryError:
        record.update(oom=True, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        return record
    times.sort()
    ms = times[len(times) // 2]
    record.update(
        oom=False,
        ms_per_step_median=ms,
        ms_per_step_all=times,
        tokens_per_s=batch * seq / (ms / 1e3),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
        losses=losses,
    )
    return record


def run_isolated(job: dict, timeout_s: int) -> dict:
    """``train_run`` in a fresh Python process (its JSON is the last stdout line)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_lce", "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout_s} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {**job, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def training_jobs(args: argparse.Namespace, variants: list[str]) -> list[dict]:
    jobs = []
    if "train" in args.parts:
        for name in args.models:
            jobs += [dict(name=name, variant=v, batch=args.batch, seq=args.seq) for v in variants]
    if "sweep" in args.parts:
        for seq in args.sweep_seqs:
            jobs += [dict(name="qwen3_0.6b", variant=v, batch=1, seq=seq, sweep=True) for v in variants]
    for job in jobs:
        job.update(steps=args.steps, warmup=args.warmup, chunk_mib=args.lce_chunk_mib)
    return jobs


# ---------------------------------------------------------------------------------------------- the op alone
def _op_providers(chunks: list[int]) -> dict[str, Any]:
    import torch.nn.functional as F

    from engine.kernels.portable.ops.linear_cross_entropy import linear_cross_entropy
    from engine.kernels.triton.ops import linear_cross_entropy as _triton  # noqa: F401  (registers "triton")

    def transformers_math(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)

    def engine(impl: str, mib: int):
        def run(h, w, t):
            denom = (t != -100).sum().float()
            return linear_cross_entropy(h, w, t, denom, impl=impl, chunk_bytes=mib << 20)

        return run

    providers = {"transformers": transformers_math}
    providers.update({f"engine triton {mib} MiB": engine("triton", mib) for mib in chunks})
    providers[f"engine torch {chunks[0]} MiB"] = engine("torch", chunks[0])
    if liger_available():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_run(h, w, t):
            out = liger(w, h, t)
            return out[0] if isinstance(out, tuple) else out

        providers["liger"] = liger_run
    return providers


def op_records(chunks: list[int]) -> list[dict]:
    from tqdm import tqdm

    providers = _op_providers(chunks)
    cases = [(8192, 1024), (8192, 896), (8192, 2048), (32768, 1024)]
    records = []
    with tqdm(total=len(cases) * len(providers), desc="op", unit="run") as bar:
        for rows, hidden in cases:
            gen = torch.Generator(device="cuda").manual_seed(0)
            h = (torch.randn(rows, hidden, device="cuda", generator=gen)).bfloat16().requires_grad_()
            w = (torch.randn(VOCAB, hidden, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
            t = torch.randint(0, VOCAB, (rows,), device="cuda", generator=gen)
            t[::7] = -100
            want = None
            for label, fn in providers.items():
                bar.set_postfix_str(f"N={rows} H={hidden} {label}")
                record = {"rows": rows, "hidden": hidden, "vocab": VOCAB, "provider": label}
                try:
                    record.update(_op_measure(fn, h, w, t, want))
                except torch.OutOfMemoryError:
                    record["oom"] = True
                if label == "transformers" and not record.get("oom"):
                    want = record.pop("_outputs")
                record.pop("_outputs", None)
                records.append(record)
                gc.collect()
                torch.cuda.empty_cache()
                bar.update()
    return records


def _op_measure(fn: Any, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, want: Any) -> dict:
    def step() -> torch.Tensor:
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        return loss

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    out = {"extra_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30, "oom": False}
    outputs = (loss.detach().float(), h.grad.float(), w.grad.float())
    if want is not None:
        for key, got, ref in zip(("loss", "grad_hidden", "grad_weight"), outputs, want, strict=True):
            out[f"{key}_rel_err"] = float((got - ref).norm() / ref.norm())
    out["fwd_bwd_ms"] = median_ms(step)
    out["_outputs"] = outputs
    return out


# ---------------------------------------------------------------------------------------------- report
def summarise(runs: list[dict]) -> dict:
    summary: dict[str, Any] = {}
    for run in runs:
        key = f"{run['model']} B{run['batch']}xT{run['seq']}"
        row = summary.setdefault(key, {})
        if run.get("error") or run.get("oom"):
            row[run["variant"]] = {"oom": bool(run.get("oom")), "error": run.get("error")}
            continue
        row[run["variant"]] = {
            "ms_per_step": round(run["ms_per_step_median"], 2),
            "tokens_per_s": round(run["tokens_per_s"]),
            "peak_mem_gib": round(run["peak_mem_gib"], 2),
            "first_loss": run["losses"][0],
        }
    for row in summary.values():
        base = row.get("transformers", {}).get("first_loss")
        for stats in row.values():
            if base is not None and "first_loss" in stats:
                stats["first_loss_rel_diff"] = abs(stats["first_loss"] - base) / abs(base)
    return summary


def merge_previous(path: Path, parts: list[str], runs: list[dict], records: list[dict]) -> tuple[list, list]:
    """Keep the parts of an earlier result file on this GPU that this invocation did not rerun."""
    if not path.exists():
        return runs, records
    old = json.loads(path.read_text())
    kept = [r for r in old.get("runs", []) if ("sweep" if r.get("sweep") else "train") not in parts]
    return kept + runs, records if "op" in parts else old.get("op", [])


def plot_lce(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in payload["runs"] if not r.get("error")]
    ops = [r for r in payload.get("op", []) if not r.get("oom")]
    fig, axes = plt.subplots(3 if ops else 2, 2, figsize=(14, 13 if ops else 9))
    train = [r for r in runs if not r.get("sweep")]
    models = list(dict.fromkeys(r["model"] for r in train))
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    width = 0.8 / max(1, len(variants))
    for ax, key, unit in ((axes[0, 0], "ms_per_step_median", "ms/step"), (axes[0, 1], "peak_mem_gib", "peak GiB")):
        for i, variant in enumerate(variants):
            ys = [next((r.get(key, 0.0) for r in train if r["model"] == m and r["variant"] == variant), 0.0) or 0.0
                  for m in models]  # fmt: skip
            bars = ax.bar([x + i * width for x in range(len(models))], ys, width, label=variant)
            ax.bar_label(bars, labels=[f"{y:.1f}" if y else "OOM/-" for y in ys], fontsize=6, rotation=90, padding=2)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(models))], models, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(f"training step B{payload['batch']}xT{payload['seq']}, {unit}")
        ax.legend(fontsize=7)
    sweep = [r for r in runs if r.get("sweep")]
    for ax, key, unit in ((axes[1, 0], "tokens_per_s", "tokens/s"), (axes[1, 1], "peak_mem_gib", "peak GiB")):
        for variant in variants:
            points = sorted((r["seq"], r.get(key)) for r in sweep if r["variant"] == variant and not r.get("oom"))
            oom = [str(r["seq"]) for r in sweep if r["variant"] == variant and r.get("oom")]
            label = variant + (f" (OOM at T={', '.join(oom)})" if oom else "")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (B1)")
        ax.set_ylabel(unit)
        ax.set_title(f"Qwen3-0.6B sequence sweep, {unit}")
        ax.legend(fontsize=7)
    if ops:
        cases = list(dict.fromkeys(f"N={r['rows']} H={r['hidden']}" for r in ops))
        providers = list(dict.fromkeys(r["provider"] for r in ops))
        width = 0.8 / len(providers)
        for ax, key, unit in ((axes[2, 0], "fwd_bwd_ms", "fwd+bwd ms"), (axes[2, 1], "extra_peak_gib", "extra GiB")):
            for i, provider in enumerate(providers):
                ys = [next((r[key] for r in ops if r["provider"] == provider
                            and f"N={r['rows']} H={r['hidden']}" == case), 0.0) for case in cases]  # fmt: skip
                ax.bar([x + i * width for x in range(len(cases))], ys, width, label=provider)
            ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(cases))], cases, fontsize=8)
            ax.set_ylabel(unit)
            ax.set_title(f"head + loss alone (V={VOCAB}, bf16), {unit}")
            ax.legend(fontsize=6)
    fig.suptitle(f"fused linear cross-entropy on {payload['environment'].get('gpu', 'GPU')} (bf16, AdamW)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["train", "sweep", "op"], choices=["train", "sweep", "op"])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--sweep-seqs", nargs="+", type=int, default=SWEEP_SEQS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lce-chunk-mib", type=int, default=None, help="engine+lce: override the spec's chunk_mib")
    parser.add_argument("--chunk-mib", nargs="+", type=int, default=[128, 256, 512, 1024], help="op part: budgets")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per training subprocess")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--replot", type=Path, help="redraw the PNG of a result JSON and exit")
    args = parser.parse_args()
    if args.replot:
        plot_lce(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    if args.worker:
        job = json.loads(args.worker)
        record = train_run(job["name"], job["variant"], job["batch"], job["seq"], job["steps"], job["warmup"],
                           job["chunk_mib"])  # fmt: skip
        print(json.dumps({**record, "sweep": job.get("sweep", False)}))
        return

    from tqdm import tqdm

    variants = [v for v in args.variants if v != "liger" or liger_available()]
    if "liger" in args.variants and "liger" not in variants:
        print("liger-kernel is not installed: the Liger variant is skipped")
    runs = []
    jobs = training_jobs(args, variants)
    for job in tqdm(jobs, desc="training runs", unit="run"):
        record = run_isolated(job, args.timeout)
        runs.append(record)
        status = record.get("error", "")[:80] or (
            "OOM" if record.get("oom") else f"{record['ms_per_step_median']:.1f} ms"
        )
        tqdm.write(f"{job['name']} B{job['batch']}xT{job['seq']} {job['variant']}: {status}")
    records = op_records(args.chunk_mib) if "op" in args.parts else []
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = args.out / f"lce_{gpu}.json"
    runs, records = merge_previous(path, args.parts, runs, records)
    payload = {
        "environment": environment(),
        "batch": args.batch,
        "seq": args.seq,
        "summary": summarise(runs),
        "runs": runs,
        "op": records,
    }
    print(json.dumps(payload["summary"], indent=1))
    for record in records:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()})
    write_json(path, payload)
    plot_lce(payload, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
