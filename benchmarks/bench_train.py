"""End-to-end training step: transformers, torch.compile, Liger-Kernel and the engine, in one run.

    python -m benchmarks.bench_train [--models qwen3_0.6b qwen2.5_0.5b qwen3_moe_4l] [--variants ...] [--steps 10]
    python -m benchmarks.bench_train --models qwen3_0.6b --batch 1 --seqs 2048 8192 32768 --tag sweep

Random-init models of real shapes (no hub access), bf16 parameters, AdamW (``--optimizer``: by default the
fused one, which transformers' Trainer picks on torch >= 2.8 and with which issue 8's table reproduces; or
torch.optim's own default, foreach), B4 x T2048 by default. Every (model, variant)
runs in its own process, because Liger patches transformers classes process-wide and so that one run's memory
does not leak into the next. Reports the median ms/step of the timed steps, tokens/s, peak memory of the
steady state (after warm-up), both of the whole step and of forward + backward alone (AdamW's step adds
parameter-sized temporaries that no kernel can remove), and the first-step loss, whose agreement across
variants is the numerics check. ``--lce-options`` overrides the linear cross-entropy entry's options.
Writes train_<gpu>.json and train_<gpu>.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, environment, write_json
from benchmarks.models import build_model, spec_of, vocab_of

VARIANTS = {
    "transformers": "transformers as is",
    "engine": "engine kernels (explicit spec, fused MoE included; no linear cross-entropy)",
    "engine+lce": "engine kernels with the fused linear cross-entropy",
    "engine+lce+recompute": "engine kernels with linear cross-entropy, SwiGLU option recompute: projections",
    "transformers+compile": "torch.compile(model) of the unpatched model",
    "engine+compile": "engine kernels, then torch.compile(model)",
    "engine+lce+compile": "engine kernels with linear cross-entropy, then torch.compile(model)",
    "engine+nomoe+compile": "engine kernels without the (manual) fused MoE entry, then torch.compile(model)",
    "liger": "Liger-Kernel RMSNorm/SwiGLU/RoPE",
    "liger+flce": "Liger-Kernel RMSNorm/SwiGLU/RoPE + fused linear cross-entropy",
}
DEFAULT_VARIANTS = ["transformers", "engine", "transformers+compile", "engine+compile", "liger", "liger+flce"]


def _engine_spec(
    model_name: str, variant: str, lce_options: dict[str, Any] | None = None, without: tuple[str, ...] = ()
):
    """The model's built-in spec as ``variant`` asks for it: without its linear cross-entropy entry unless
    ``+lce`` (then with ``lce_options`` over the entry's own options); with ``+recompute``, the SwiGLU entry
    recomputes its projections in backward; ``+nomoe`` leaves the fused MoE entry out, ``without`` the entries
    it names (an A/B of one entry). Changed entries are validated again, like a spec file."""
    from engine.catalog import find_spec
    from engine.spec import SpecEntry

    spec = find_spec(spec_of(model_name))
    entries = []
    for entry in spec.entries:
        extra: dict[str, Any] = {}
        if entry.kernel == "linear_cross_entropy":
            if "+lce" not in variant:
                continue
            extra = lce_options or {}
        if (entry.kernel == "fused_moe" and "+nomoe" in variant) or entry.name in without:
            continue
        if entry.kernel == "swiglu" and "+recompute" in variant:
            extra = {"recompute": "projections"}
        if extra:
            entry = SpecEntry.model_validate({**entry.model_dump(), "options": {**entry.options, **extra}})
        entries.append(entry)
    return spec.model_copy(update={"entries": entries})


def _apply_liger(model: torch.nn.Module, model_name: str, flce: bool) -> None:
    import liger_kernel.transformers as liger

    family = spec_of(model_name)  # the engine's spec names match Liger's apply_liger_kernel_to_<family>
    getattr(liger, f"apply_liger_kernel_to_{family}")(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=flce, model=model
    )


def prepare(
    model_name: str, variant: str, lce_options: dict[str, Any] | None = None, without: tuple[str, ...] = ()
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    model = build_model(model_name)
    report = None
    if variant.startswith("engine"):
        import engine

        spec = _engine_spec(model_name, variant, lce_options, without)
        handle = engine.apply(model, spec=spec, device="cuda")
        report = handle.report.to_dict()
    elif variant.startswith("liger"):
        _apply_liger(model, model_name, flce=variant == "liger+flce")
    if variant.endswith("+compile"):
        model = torch.compile(model)
    return model, report


def out_of_memory(model_name: str, variant: str, batch: int, seq: int) -> dict[str, Any]:
    """Running out of memory is a result, recorded as such (with the peak reached)."""
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"model": model_name, "variant": variant, "batch": batch, "seq": seq, "error": "out of memory",
            "peak_mem_gib": peak}  # fmt: skip


def run_one(
    model_name: str,
    variant: str,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    lce_options: dict[str, Any],
    optimizer_impl: str,
    without: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One (model, variant, shape) in this process: warm-up, then timed steps."""
    from tqdm import tqdm

    torch.manual_seed(0)
    model, report = prepare(model_name, variant, lce_options, without)
    fused = optimizer_impl == "fused"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=not fused, fused=fused)
    vocab = vocab_of(model_name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen) for _ in range(4)]
    times, losses = [], []
    compile_s = 0.0
    peak_fwd_bwd = peak_step = 0
    for step in tqdm(range(warmup + steps), desc=f"{model_name} {variant}", unit="step", file=sys.stderr):
        ids = data[step % len(data)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # each step's peaks on their own, outside the clock
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step >= warmup:  # the peak before the optimizer adds its own (AdamW's temporaries): the model's part
            peak_fwd_bwd = max(peak_fwd_bwd, torch.cuda.max_memory_allocated())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if step >= warmup:
            peak_step = max(peak_step, torch.cuda.max_memory_allocated())
        if step == 0:
            compile_s = elapsed
        if step >= warmup:
            times.append(elapsed * 1e3)
        losses.append(float(loss))
    times.sort()
    ms = times[len(times) // 2]
    return {
        "model": model_name,
        "variant": variant,
        "batch": batch,
        "seq": seq,
        "ms_per_step_median": ms,
        "ms_per_step_all": times,
        "tokens_per_s": batch * seq / (ms / 1e3),
        "peak_mem_gib": peak_step / 2**30,
        "peak_fwd_bwd_gib": peak_fwd_bwd / 2**30,
        "first_step_s": compile_s,
        "losses": losses,
        "patch_report": report,
    }


def run_isolated(args: argparse.Namespace, model_name: str, variant: str, seq: int) -> dict[str, Any]:
    """One (model, variant, seq) in a fresh process; an out-of-memory or crash is recorded, not fatal."""
    command = [sys.executable, "-m", "benchmarks.bench_train", "--worker", model_name, variant]
    command += ["--batch", str(args.batch), "--seqs", str(seq), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--lce-options", json.dumps(args.lce_options)]
    command += ["--optimizer", args.optimizer, "--without", *args.without]
    shape = {"model": model_name, "variant": variant, "batch": args.batch, "seq": seq}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**shape, "error": f"timed out after {args.timeout} s"}
    sys.stderr.write(done.stderr[-2000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        oom = "out of memory" in done.stderr.lower()
        return {**shape, "error": "out of memory" if oom else tail[-300:]}
    return json.loads(lines[-1])


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: each variant's ms/step and peak GiB, and the ratios the issues ask about."""
    summary: dict[str, dict[str, Any]] = {}
    for row in results:
        entry = summary.setdefault(f"{row['model']} B{row['batch']}xT{row['seq']}", {})
        if "error" in row:
            entry[row["variant"]] = {"error": row["error"]}
            continue
        entry[row["variant"]] = {
            "ms": row["ms_per_step_median"],
            "tokens_per_s": row["tokens_per_s"],
            "peak_gib": row["peak_mem_gib"],
            "peak_fwd_bwd_gib": row["peak_fwd_bwd_gib"],
            "first_loss": row["losses"][0],
        }
    for entry in summary.values():
        ms = {k: v["ms"] for k, v in entry.items() if "ms" in v}
        ratios = {}
        for fast, base in (
            ("engine", "transformers"),
            ("engine+compile", "transformers+compile"),
            ("engine+lce+compile", "transformers+compile"),
            ("engine+nomoe+compile", "transformers+compile"),
            ("engine+lce", "engine"),
            ("engine+lce", "liger+flce"),
            ("engine+lce+recompute", "engine"),
            ("engine+lce+recompute", "liger+flce"),
        ):
            if fast in ms and base in ms:
                ratios[f"{fast} / {base}"] = ms[fast] / ms[base]
        entry["time_ratios"] = ratios
    return summary


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    for model_name, entry in summary.items():
        print(f"\n{model_name}")
        for variant, row in entry.items():
            if variant == "time_ratios":
                continue
            if "error" in row:
                print(f"  {variant:22s} {row['error']}")
            else:
                ms, gib, model_gib, loss = row["ms"], row["peak_gib"], row["peak_fwd_bwd_gib"], row["first_loss"]
                print(f"  {variant:22s} {ms:8.1f} ms/step {gib:6.1f} GiB (fwd+bwd {model_gib:5.1f})  loss0 {loss:.5f}")
        for name, ratio in entry["time_ratios"].items():
            print(f"  ratio {name}: {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3_0.6b", "qwen2.5_0.5b", "qwen3_moe_4l"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048], help="sequence lengths (a sweep if several)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=420, help="seconds per (model, variant) process")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument(
        "--lce-options",
        type=json.loads,
        default={},
        help="JSON over the linear CE entry's options, e.g. '{\"chunk_mib\": 256}'",
    )
    parser.add_argument(
        "--optimizer",
        choices=["foreach", "fused"],
        default="fused",
        help="AdamW implementation: fused (transformers Trainer's default) or foreach (torch.optim's default)",
    )
    parser.add_argument(
        "--without", nargs="*", default=[], metavar="ENTRY", help="spec entries the engine variants leave out"
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_name, variant = args.worker
        try:
            row = run_one(
                model_name,
                variant,
                args.batch,
                args.seqs[0],
                args.steps,
                args.warmup,
                args.lce_options,
                args.optimizer,
                tuple(args.without),
            )
        except torch.OutOfMemoryError:
            row = out_of_memory(model_name, variant, args.batch, args.seqs[0])
        print(json.dumps(row))
        return
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = args.out / f"train_{gpu}{'_' + args.tag if args.tag else ''}.json"
    results: list[dict[str, Any]] = []
    for model_name in args.models:
        for seq in args.seqs:
            for variant in args.variants:
                results.append(run_isolated(args, model_name, variant, seq))
                payload = {
                    "environment": environment(),
                    "batch": args.batch,
                    "seqs": args.seqs,
                    "variants": {v: VARIANTS[v] for v in args.variants},
                    "lce_options": args.lce_options,
                    "optimizer": f"AdamW ({args.optimizer})",
                    "engine_entries_left_out": args.without,
                    "summary": summarise(results),
                    "runs": results,
                }
                write_json(path, payload)  # after every run, so a cut-off session keeps what finished
    print_table(payload["summary"])
    from benchmarks.plots import plot_train

    plot_train(payload, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
