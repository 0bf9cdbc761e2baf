"""CPU cost per call (microseconds of host time to enqueue) of the RMSNorm paths: finds launch-bound cases.

python benchmarks/launch_overhead.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.kernels.triton import rms_norm as rn  # noqa: E402


def host_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main() -> None:
    rows, cols = 65536, 128
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device="cuda", dtype=torch.float32)
    args = (x, w, y, rstd, x.stride(0), y.stride(0), rows, cols, 1e-6, 0.0)
    meta = dict(BLOCK_M=32, BLOCK_N=128, GEMMA=False, num_warps=4)
    grid = (rows // 32,)
    results = {"triton jit launch": host_us(lambda: rn._rms_norm_fwd[grid](*args, **meta))}
    with torch.no_grad():
        results["engine fwd (no grad)"] = host_us(lambda: rn.rms_norm(x, w, 1e-6))
        results["F.rms_norm fwd (no grad)"] = host_us(lambda: F.rms_norm(x, (cols,), w, 1e-6))
    results["engine fwd (grad)"] = host_us(lambda: rn.rms_norm(x, w, 1e-6))

    def fb(fn):
        def run():
            x.grad = w.grad = None
            fn().backward(dy)

        return run

    results["engine fwd+bwd"] = host_us(fb(lambda: rn.rms_norm(x, w, 1e-6)))
    results["F.rms_norm fwd+bwd"] = host_us(fb(lambda: F.rms_norm(x, (cols,), w, 1e-6)))
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        results["liger fwd+bwd"] = host_us(fb(lambda: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)))
    except Exception as exc:
        print("liger:", exc)
    for name, us in results.items():
        print(f"{name:28s} {us:8.1f} us host time per call")


if __name__ == "__main__":
    main()
