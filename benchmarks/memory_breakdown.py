"""Where a training step's GPU memory goes: allocated memory at each phase, and what is saved for backward.

    python -m benchmarks.memory_breakdown [--model qwen3_0.6b] [--variant engine+lce] [--batch 4] [--seq 2048]

Runs two steps (the second has AdamW's state) and prints, per step, the memory at the start, after forward,
and the forward and backward peaks; then the unique storages saved for backward, grouped by shape, dtype and
the op that produced them (parameters left out). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import collections

import torch

from benchmarks.bench_train import VARIANTS, prepare
from benchmarks.models import CONFIGS, vocab_of

GIB = 2**30


def saved_storages(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, tuple]]:
    """The loss of one forward, and every storage autograd saved during it: ptr -> (bytes, shape, dtype, source)."""
    saved: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            source = "param"  # a weight or a view of one (a transposed weight): no memory of its own
        else:
            source = type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf"
        saved[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape), str(t.dtype).removeprefix("torch."), source)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3_0.6b", choices=list(CONFIGS))
    parser.add_argument("--variant", default="engine+lce", choices=[v for v in VARIANTS if "compile" not in v])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    model, _ = prepare(args.model, args.variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, vocab_of(args.model), (args.batch, args.seq), device="cuda")
    saved: dict[int, tuple] = {}
    for step in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss, saved = saved_storages(model, ids)
        after_forward, forward_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        backward_peak = torch.cuda.max_memory_allocated()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(
            f"step {step}: start {start / GIB:.2f}  after forward {after_forward / GIB:.2f}  "
            f"forward peak {forward_peak / GIB:.2f}  backward peak {backward_peak / GIB:.2f} GiB"
        )
    groups: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    for nbytes, shape, dtype, source in saved.values():
        if source != "param":
            groups[(shape, dtype, source)][0] += 1
            groups[(shape, dtype, source)][1] += nbytes
    total = sum(g[1] for g in groups.values())
    print(f"saved for backward (unique storages, parameters left out): {total / GIB:.2f} GiB")
    for (shape, dtype, source), (count, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {nbytes / GIB:7.3f} GiB  {count:4d} x {shape} {dtype} from {source}")


if __name__ == "__main__":
    main()
