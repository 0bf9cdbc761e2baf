"""Fused MoE experts at the Qwen3-30B-A3B layer shape: transformers eager / grouped_mm vs Liger vs engine.

    python -m benchmarks.bench_moe [--tokens 4096 16384] [--sweep]

hidden 2048, moe_intermediate 768, 128 experts, top-8, bf16, router-like skewed routing. Checks output and all
gradients against an fp32 run of transformers first, then times forward and forward+backward.
Writes moe_<gpu>.json and moe_<gpu>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment, fwd_bwd, median_ms, write_json
from benchmarks.plots import plot_moe
from engine.kernels.triton import moe_tiles
from engine.kernels.triton.ops import library, moe_grouped
from engine.kernels.triton.ops import moe as engine_moe

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
TARGETS_MS = {4096: 4.0, 16384: 11.0}  # issue #4, H100 bf16 fwd+bwd


def experts_module(implementation: str, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    config._experts_implementation = implementation
    module = Qwen3MoeExperts(config).to("cuda", dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, HIDDEN**-0.5)
        module.down_proj.normal_(0, INTER**-0.5)
    return module


def routing(tokens: int, dtype):
    """Softmax-top-k over skewed logits, like a router early in training (uneven expert loads)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    bias = torch.linspace(0, 2, EXPERTS, device="cuda")
    logits = torch.randn(tokens, EXPERTS, device="cuda", generator=gen) + bias
    weights, index = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    return index, (weights / weights.sum(-1, keepdim=True)).to(dtype)


def providers(module, tokens: int, dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    index, weights = routing(tokens, dtype)
    weights.requires_grad_(True)
    grad = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype, generator=gen)
    eager = experts_module("eager", dtype)
    grouped = experts_module("grouped_mm", dtype)
    for other in (eager, grouped):
        other.gate_up_proj, other.down_proj = module.gate_up_proj, module.down_proj

    def engine():
        return engine_moe.fused_moe(x, module.gate_up_proj, module.down_proj, index, weights)

    compiled = torch.compile(grouped)
    fns = {
        "transformers_grouped_mm": lambda: grouped(x, index, weights),
        "transformers_grouped_mm+compile": lambda: compiled(x, index, weights),
        "engine": engine,
        "engine_fn": engine,  # timed under eager_path("function"): a plain autograd.Function, no dispatcher
        "engine_triton_gemms": engine,  # timed under triton_gemms(): the Triton GEMMs where CUTLASS would run
    }
    if tokens <= 4096:
        fns["transformers_eager"] = lambda: eager(x, index, weights)
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        fns["liger"] = lambda: LigerFusedMoEFunction.apply(x, module.gate_up_proj, module.down_proj, index, weights)
    except Exception as exc:
        print(f"liger fused MoE unavailable: {exc}")
    leaves = [x, weights, module.gate_up_proj, module.down_proj]
    return fns, leaves, grad


@contextlib.contextmanager
def triton_gemms() -> Iterator[None]:
    """The engine's Triton expert GEMMs even where ``moe_grouped`` would take the call (bf16 on Hopper)."""
    real = moe_grouped.fits
    moe_grouped.fits = lambda *args, **kwargs: False
    try:
        yield
    finally:
        moe_grouped.fits = real


def reference_grads(leaves, grad, index) -> list[torch.Tensor]:
    """Output and gradients of an fp32 run with transformers' semantics."""
    from engine.kernels.kinds.fused_moe import reference

    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    x, w, gate_up, down = ref_leaves
    out = reference(x, index, w, gate_up, down)
    out.backward(grad.float())
    return [out.detach()] + [t.grad for t in ref_leaves]


def errors_of(fn, leaves, grad, ref) -> dict[str, float]:
    for t in leaves:
        t.grad = None
    out = fn()
    out.backward(grad)
    got = [out.detach()] + [t.grad.detach().clone() for t in leaves]
    for t in leaves:
        t.grad = None
    names = ["out", "d_x", "d_weights", "d_gate_up", "d_down"]
    return {k: float((g.float() - r).norm() / r.norm()) for k, g, r in zip(names, got, ref, strict=True)}


def _prefer(name: str, candidate: tuple[int, ...]) -> None:
    """Put ``candidate`` first in a kernel's tile candidates (the chooser takes the first that fits)."""
    table = moe_tiles.ROW_GEMM_CANDIDATES if name in moe_tiles.ROW_GEMM_CANDIDATES else None
    if table is not None:
        table[name] = (candidate, *(c for c in table[name] if c != candidate))
    else:
        moe_tiles.WGRAD_CANDIDATES = (candidate, *(c for c in moe_tiles.WGRAD_CANDIDATES if c != candidate))
    moe_tiles.choose_tiles.cache_clear()


def sweep(module, tokens: int, dtype) -> None:
    """Try tile configurations for each engine GEMM and keep the fastest (prints the table); a tile that
    does not fit the device's shared memory is skipped by the chooser, so the fastest fitting one wins."""
    fns, leaves, grad = providers(module, tokens, dtype)
    run = fwd_bwd(fns["engine"], leaves, [grad])
    for name in [*moe_tiles.ROW_GEMM_CANDIDATES, "wgrad"]:
        best = None
        for bn, bk, warps, stages in itertools.product((64, 128), (64,), (4, 8), (3, 4)):
            candidate = (bn, bk, warps, stages) if name != "wgrad" else (128, bn, bk, warps, stages)
            _prefer(name, candidate)
            ms = median_ms(run, warmup_ms=25, rep_ms=100)
            if best is None or ms < best[0]:
                best = (ms, candidate)
        _prefer(name, best[1])
        print(f"  sweep {name}: best {best[1]} -> fwd+bwd {best[0]:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--sweep", action="store_true", help="tune engine tile configs first (at the first T)")
    args = parser.parse_args()
    dtype = torch.bfloat16
    module = experts_module("eager", dtype)
    module.gate_up_proj.requires_grad_(True)
    if args.sweep:
        sweep(module, args.tokens[0], dtype)
    records, errors = [], {}
    for tokens in args.tokens:
        fns, leaves, grad = providers(module, tokens, dtype)
        ref = reference_grads(leaves, grad, routing(tokens, dtype)[0])
        errors[tokens] = {}
        for name, fn in fns.items():
            gemms = triton_gemms() if name == "engine_triton_gemms" else contextlib.nullcontext()
            with gemms, library.eager_path("function" if name == "engine_fn" else "op"):
                errors[tokens][name] = errors_of(fn, leaves, grad, ref)
                row = {
                    "tokens": tokens,
                    "provider": name,
                    "fwd_ms": median_ms(fn),
                    "fwd_bwd_ms": median_ms(fwd_bwd(fn, leaves, [grad])),
                }
            records.append(row)
            errs = ", ".join(f"{k} {v:.1e}" for k, v in errors[tokens][name].items())
            print(
                f"  T={tokens:6d} {name:24s} fwd {row['fwd_ms']:.3f} ms  fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
                f"  (rel. err vs fp32: {errs})",
                flush=True,
            )
    summary = {}
    for tokens in args.tokens:
        rows = {r["provider"]: r for r in records if r["tokens"] == tokens}
        engine_ms = rows["engine"]["fwd_bwd_ms"]
        summary[str(tokens)] = {
            "engine_fwd_bwd_ms": engine_ms,
            "target_ms": TARGETS_MS.get(tokens),
            **{f"speedup_vs_{p}": r["fwd_bwd_ms"] / engine_ms for p, r in rows.items() if p != "engine"},
        }
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    tiles = moe_tiles.plan_tiles(args.tokens[0] * TOP_K, EXPERTS, dtype, torch.device("cuda"))
    configs = {k: vars(v) for k, v in tiles.configs.items()} if tiles is not None else None
    payload = {
        "environment": environment(),
        "shape": {
            "hidden": HIDDEN,
            "moe_intermediate": INTER,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "dtype": "bfloat16",
        },
        "engine_tile_configs": configs,
        "summary": summary,
        "errors_vs_fp32": errors,
        "records": records,
    }
    write_json(args.out / f"moe_{gpu}.json", payload)
    plot_moe(payload, args.out / f"moe_{gpu}.png")
    print("\nsummary:", summary)


if __name__ == "__main__":
    main()
