"""FSDP2 parity: unpatched vs patched-before vs patched-after ``fully_shard``, any number of ranks.

    torchrun --nproc-per-node 2 tests/distributed/fsdp2_parity.py --device cuda --model qwen3_8l --out res.json
    torchrun --nproc-per-node 2 tests/distributed/fsdp2_parity.py --device cpu          # gloo, NPU stand-in

Each variant trains the same model from the same seed for ``--steps`` steps (AdamW), sharded per decoder layer
and then at the root. Rank 0 writes per-variant losses and median step times as JSON. ``--noise-floor`` adds an
unpatched run with transformers' eager attention instead of SDPA: how far two implementations that transformers
itself ships drift apart in the same dtype, the scale against which the patched runs' gaps are read.
``--attribution`` adds a patched run without the linear cross-entropy entry, and an unpatched run of the same
initial weights upcast to fp32: each bf16 run's gap to that fp32 run says how far it is from the exact
result, so a patched run that differs from the unpatched one can be told apart from a patched run that is worse.

``--deterministic`` runs every variant with PyTorch's deterministic algorithms (cuBLAS workspace config; cuDNN
attention's deterministic backward, which ``warn_only=True`` would not select; an op without a deterministic
algorithm raises) and adds a second unpatched run, which must equal the first. Without it the unpatched run is
not reproducible itself in bf16 (measured on 2 x H200: 2.1e-4 between two unpatched runs), so the gaps mix that
noise with the kernels' own differences; with it, a gap is the kernels' difference alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import engine
from engine.catalog import find_spec
from engine.testing import tiny_models

VARIANTS = ("unpatched", "patch_before_shard", "patch_after_shard")
NOISE_FLOOR = "unpatched_eager_attention"
WITHOUT_LCE = "patch_before_shard_without_linear_ce"
FP32_REFERENCE = "unpatched_fp32_reference"
REPEAT = "unpatched_repeat"


def build(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if name == "tiny":
        return tiny_models.build("qwen3").to(dtype)
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).train()


def run(variant: str, args: argparse.Namespace, mesh, device: torch.device) -> dict:
    model = build(args.model, device.type, getattr(torch, args.dtype)).to(device)
    if variant == NOISE_FLOOR:
        model.set_attn_implementation("eager")
    if variant == FP32_REFERENCE:
        model = model.float()
    spec = find_spec("qwen3")
    if variant == WITHOUT_LCE:
        kept = [e for e in spec.entries if e.kernel != "linear_cross_entropy"]
        spec = spec.model_copy(update={"entries": kept})
    if variant in ("patch_before_shard", WITHOUT_LCE):
        engine.apply(model, spec=spec, verbose=False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = None
    if variant == "patch_after_shard":
        report = engine.apply(model, spec=spec, verbose=False).report
    if variant.startswith("patch"):
        report = report or engine.kernel_report(model)
        assert {p.entry for p in report.patched} >= {"rms_norm", "swiglu", "rope"}, report.summary()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    losses, times = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(float(loss.detach()))
    engine.revert(model)
    return {"losses": losses, "ms_per_step_median": statistics.median(times[1:] or times), "report": str(report)}


def largest_gap(losses: list[float], base: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, base, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="tiny", choices=["tiny", "qwen3_8l"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=12)
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="parameters' dtype (default: fp32 tiny, bf16 qwen3_8l)"
    )
    parser.add_argument("--noise-floor", action="store_true", help=f"also run {NOISE_FLOOR} (see the docstring)")
    parser.add_argument(
        "--attribution", action="store_true", help=f"also run {WITHOUT_LCE} and {FP32_REFERENCE} (see the docstring)"
    )
    parser.add_argument(
        "--deterministic", action="store_true", help=f"deterministic algorithms, and {REPEAT} (see the docstring)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when the first cuBLAS handle is made
        torch.use_deterministic_algorithms(True)
    args.dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")
    rank = int(os.environ["RANK"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl")
        standin = contextlib.nullcontext()
    else:  # NPU kernels on CPU tensors through the torch_npu stand-in
        from engine.testing.torch_npu_standin import torch_npu_standin

        os.environ["ENGINE_DEVICE"] = "npu"
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        standin = torch_npu_standin()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with standin:
        variants = (*VARIANTS, *((NOISE_FLOOR,) if args.noise_floor else ()))
        variants += (WITHOUT_LCE, FP32_REFERENCE) if args.attribution else ()
        variants += (REPEAT,) if args.deterministic else ()
        results = {variant: run(variant, args, mesh, device) for variant in variants}
    dist.barrier()
    if rank == 0:
        gaps = {  # the largest relative gap of each other run's losses to the unpatched sharded run's
            variant: largest_gap(result["losses"], results["unpatched"]["losses"])
            for variant, result in results.items()
            if variant != "unpatched"
        }
        to_fp32 = {
            variant: largest_gap(result["losses"], results[FP32_REFERENCE]["losses"])
            for variant, result in results.items()
            if FP32_REFERENCE in results and variant != FP32_REFERENCE
        }
        payload = {
            "world_size": dist.get_world_size(),
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "deterministic": args.deterministic,
            "max_relative_loss_gap": gaps,
            **({"max_relative_loss_gap_to_fp32_reference": to_fp32} if to_fp32 else {}),
            **results,
        }
        text = json.dumps(payload, indent=2)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
