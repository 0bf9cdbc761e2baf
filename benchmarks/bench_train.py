"""End-to-end training step with and without engine kernels (random-init models, no hub access).

    python benchmarks/bench_train.py [--models qwen3_0.6b qwen3_moe_4l] [--steps 10]

B4 x T2048, bf16 parameters, AdamW. Reports ms/step, tokens/s and peak memory, and the first-step loss of both
variants (same seed, same data) as a parity check. Writes train_<gpu>.json and train_<gpu>.png.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402
from benchmarks.common import RESULTS_DIR, environment, write_json  # noqa: E402
from benchmarks.plots import plot_train  # noqa: E402

ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}


def build(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    if name == "qwen3_0.6b":
        config = Qwen3Config(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
            rope_parameters=ROPE,
        )
    elif name == "qwen3_moe_4l":
        config = Qwen3MoeConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rope_parameters=ROPE,
        )
    else:
        raise SystemExit(f"unknown model {name}")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.train()


def spec_of(name: str) -> str:
    return "qwen3" if name == "qwen3_0.6b" else "qwen3_moe"


def run(name: str, kernels: bool, batch: int, seq: int, steps: int, warmup: int) -> dict:
    from tqdm import tqdm

    model = build(name)
    report = None
    if kernels:
        handle = engine.apply(model, spec=spec_of(name), device="cuda")
        report = handle.report.to_dict()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda", generator=gen) for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    label = f"{name} {'engine' if kernels else 'baseline'}"
    for step in tqdm(range(warmup + steps), desc=label, unit="step"):
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
    times.sort()
    ms = times[len(times) // 2]
    result = {
        "model": name,
        "kernels": kernels,
        "ms_per_step_median": ms,
        "ms_per_step_all": times,
        "tokens_per_s": batch * seq / (ms / 1e3),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": losses,
        "patch_report": report,
    }
    del model, optimizer, data
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["qwen3_0.6b", "qwen3_moe_4l"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    results, summary = [], {}
    for name in args.models:
        base = run(name, False, args.batch, args.seq, args.steps, args.warmup)
        fast = run(name, True, args.batch, args.seq, args.steps, args.warmup)
        results += [base, fast]
        summary[name] = {
            "baseline_ms": base["ms_per_step_median"],
            "engine_ms": fast["ms_per_step_median"],
            "speedup": base["ms_per_step_median"] / fast["ms_per_step_median"],
            "baseline_tokens_per_s": base["tokens_per_s"],
            "engine_tokens_per_s": fast["tokens_per_s"],
            "baseline_peak_gib": base["peak_mem_gib"],
            "engine_peak_gib": fast["peak_mem_gib"],
            "first_step_loss": {"baseline": base["losses"][0], "engine": fast["losses"][0]},
        }
        print(f"{name}: {summary[name]}")
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    payload = {"environment": environment(), "batch": args.batch, "seq": args.seq, "summary": summary, "runs": results}
    write_json(args.out / f"train_{gpu}.json", payload)
    plot_train(payload, args.out / f"train_{gpu}.png")


if __name__ == "__main__":
    main()
