"""Host time of one forward+backward, split where it goes: finds launch-bound cases (run on a GPU).

    python -m benchmarks.launch_overhead [--out benchmarks/results]

Per call, medians over a few hundred calls with no synchronisation in the loop:
``fwd`` (the forward call), ``handoff`` (``backward()`` entered until the op's backward starts, on autograd's
device thread), ``bwd`` (the op's backward body), ``return`` (until ``backward()`` returns), ``total``.
The split needs a Python backward (Liger, and engine on the autograd.Function path ``engine (function)``); for
the engine operator path (``engine``) and F.rms_norm only fwd and total are known.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, environment, write_json
from engine.kernels.triton.ops import library
from engine.kernels.triton.ops import rms_norm as rn
from engine.kernels.triton.ops.rope import ROPE, rope
from engine.kernels.triton.ops.swiglu import SWIGLU, swiglu

_marks: dict[str, int] = {}


def _instrument(function_class) -> Callable[[], None]:
    """Wrap an autograd.Function's backward to stamp its start and end; returns the undo."""
    original = function_class.backward

    def timed(ctx, *grads):
        _marks["in"] = time.perf_counter_ns()
        result = original(ctx, *grads)
        _marks["out"] = time.perf_counter_ns()
        return result

    function_class.backward = staticmethod(timed)
    return lambda: setattr(function_class, "backward", staticmethod(original))


def split_host_us(fn, leaves, grads, function_class=None, calls: int = 300) -> dict[str, float]:
    undo = _instrument(function_class) if function_class else (lambda: None)
    rows = []
    try:
        for i in range(calls + 30):
            for t in leaves:
                t.grad = None
            _marks.clear()
            t0 = time.perf_counter_ns()
            out = fn()
            t1 = time.perf_counter_ns()
            torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)
            t2 = time.perf_counter_ns()
            if i >= 30:
                row = {"fwd": t1 - t0, "total": t2 - t0}
                if _marks:
                    row.update(handoff=_marks["in"] - t1, bwd=_marks["out"] - _marks["in"], ret=t2 - _marks["out"])
                rows.append(row)
        torch.cuda.synchronize()
    finally:
        undo()
    return {k: statistics.median(r[k] for r in rows) / 1e3 for k in rows[0]}


def cases():
    dtype = torch.bfloat16
    liger = {}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        liger = {"rms": LigerRMSNormFunction, "rope": LigerRopeFunction, "swiglu": LigerSiLUMulFunction}
    except Exception as exc:
        print(f"liger-kernel unavailable: {exc}")
    for rows, cols in ((65536, 128), (16384, 4096)):
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.ones(cols, device="cuda", dtype=dtype, requires_grad=True)
        providers = {
            "engine": (lambda x=x, w=w: rn.rms_norm(x, w, 1e-6), None),
            "engine (function)": (lambda x=x, w=w: rn.rms_norm(x, w, 1e-6), rn.RMS_NORM.function),
            "F.rms_norm": (lambda x=x, w=w, c=cols: F.rms_norm(x, (c,), w, 1e-6), None),
        }
        if liger:
            providers["liger"] = (lambda x=x, w=w: liger["rms"].apply(x, w, 1e-6, 0.0, "llama", False), liger["rms"])
        yield f"rms_norm {rows}x{cols}", providers, [x, w], [torch.randn_like(x)]
    a = torch.randn(16384, 11008, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn_like(a, requires_grad=True)
    providers = {"engine": (lambda: swiglu(a, b), None), "engine (function)": (lambda: swiglu(a, b), SWIGLU.function)}
    if liger:
        providers["liger"] = (lambda: liger["swiglu"].apply(a, b), liger["swiglu"])
    yield "swiglu 16384x11008", providers, [a, b], [torch.randn_like(a)]
    q = torch.randn(4, 2048, 32, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(4, 2048, 8, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(True)
    cos = torch.randn(1, 2048, 128, device="cuda", dtype=dtype)
    sin = torch.randn_like(cos)
    providers = {
        "engine": (lambda: rope(q, k, cos, sin), None),
        "engine (function)": (lambda: rope(q, k, cos, sin), ROPE.function),
    }
    if liger:
        providers["liger"] = (lambda: liger["rope"].apply(q, k, cos, sin), liger["rope"])
    yield "rope B4 T2048 32/8 heads d128", providers, [q, k], [torch.randn_like(q), torch.randn_like(k)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    records = []
    for case, providers, leaves, grads in cases():
        for provider, (fn, cls) in providers.items():
            path = "function" if "function" in provider else "op"
            with library.eager_path(path):
                split = split_host_us(fn, leaves, grads, cls)
            records.append({"case": case, "provider": provider, **split})
            parts = "  ".join(f"{k} {v:6.1f}" for k, v in split.items())
            print(f"{case:30s} {provider:30s} {parts} us")
    write_json(args.out / "launch_overhead.json", {"environment": environment(), "records": records})


if __name__ == "__main__":
    main()
