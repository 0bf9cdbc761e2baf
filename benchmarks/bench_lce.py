"""Fused linear cross-entropy, the head and loss alone: transformers' math vs the engine op vs Liger-Kernel.

    python -m benchmarks.bench_lce [--chunk-mib 128 256 512 1024]

fwd+bwd of ``cross_entropy(hidden @ weight.T)`` at V=151936 in bf16 for N=8192 rows (H=1024, 896, 2048) and
N=32768 (H=1024): transformers' math (bf16 logits, fp32 upcast, cross_entropy), the engine operator with the
Triton chunk loss at each --chunk-mib budget and with the portable torch chunk loss, and Liger's fused linear
cross-entropy: ms (CUDA events, L2 flushed), extra peak memory, loss and gradient error against transformers'
math. Training steps and the sequence-length sweep are ``benchmarks.bench_train`` runs (``engine+lce``,
``liger+flce``, ``--seqs``). Writes lce_op_<gpu>.json and lce_op_<gpu>.png.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, bar_plot, environment, median_ms, write_json

VOCAB = 151936


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


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


def plot_op(payload: dict[str, Any], path: Path) -> None:
    groups: dict[str, dict[str, float]] = {}
    for r in payload["op"]:
        if r.get("oom"):
            continue
        case = f"N={r['rows']} H={r['hidden']}"
        groups.setdefault(f"{case}\nms", {})[r["provider"]] = r["fwd_bwd_ms"]
        groups.setdefault(f"{case}\nextra GiB", {})[r["provider"]] = r["extra_peak_gib"]
    gpu = payload["environment"].get("gpu", "GPU")
    bar_plot(path, f"head + loss fwd+bwd, V={VOCAB}, bf16 on {gpu}; lower is better", groups, "ms / GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-mib", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    records = op_records(args.chunk_mib)
    for r in records:
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    payload = {"environment": environment(), "op": records}
    write_json(args.out / f"lce_op_{gpu}.json", payload)
    plot_op(payload, args.out / f"lce_op_{gpu}.png")


if __name__ == "__main__":
    main()
