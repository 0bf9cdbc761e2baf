# ruff: noqa
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.kernels.triton import rms_norm as rn
from engine.kernels.triton import launch as L

def us(fn, n=2000):
    for _ in range(100): fn()
    torch.cuda.synchronize(); t = time.perf_counter_ns()
    for _ in range(n): fn()
    e = (time.perf_counter_ns() - t) / n / 1e3; torch.cuda.synchronize(); return e

class Nop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, off, g):
        y = torch.empty_like(x); ctx.save_for_backward(x, w); return y
    @staticmethod
    def backward(ctx, g): return g, None, None, None, None

x = torch.randn(65536, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.ones(128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn_like(x)
y, xr, rstd = rn._forward(x, w, 1e-6, 0.0, False)
args = (x, w, y, rstd, 128, 128, 65536, 128, 1e-6, 0.0)
meta = dict(BLOCK_M=32, BLOCK_N=128, GEMMA=False, num_warps=4)
L.launch(rn._rms_norm_fwd, (2048,), *args, **meta); L.launch(rn._rms_norm_fwd, (2048,), *args, **meta)
compiled, trailing = next(iter(L._caches[id(rn._rms_norm_fwd)].values()))
full = (*args, *trailing)
real_launch = rn.launch
def fwd_nolaunch():
    rn.launch = lambda *a, **k: None
    try: return rn._forward(x, w, 1e-6, 0.0, False)
    finally: rn.launch = real_launch
def bwd_nolaunch():
    rn.launch = lambda *a, **k: None
    try: return rn._backward(xr, w, rstd, dy, 0.0, False, True)
    finally: rn.launch = real_launch
rows = {
 "Function.apply nop(+empty,save)": lambda: Nop.apply(x, w, 1e-6, 0.0, False),
 "rms_norm fwd (grad)": lambda: rn.rms_norm(x, w, 1e-6),
 "_forward": lambda: rn._forward(x, w, 1e-6, 0.0, False),
 "_forward no launch": fwd_nolaunch,
 "_backward": lambda: rn._backward(xr, w, rstd, dy, 0.0, False, True),
 "_backward no launch": bwd_nolaunch,
 "launch()": lambda: L.launch(rn._rms_norm_fwd, (2048,), *args, **meta),
 "kernel[grid]": lambda: rn._rms_norm_fwd[(2048,)](*args, **meta),
 "compiled.run": lambda: compiled.run(2048, 1, 1, torch._C._cuda_getCurrentRawStream(0), compiled.function, compiled.packed_metadata, None, None, None, *full),
 "spec key": lambda: L.specialization_key(args),
 "empty_like": lambda: torch.empty_like(x),
 "new_empty rstd": lambda: x.new_empty(65536, dtype=torch.float32),
 "empty_like(weight)": lambda: torch.empty_like(w),
 "is_capturing": lambda: torch.cuda.is_current_stream_capturing(),
 "tail_workspace": lambda: rn._tail_workspace(x.device, 264 * 128),
 "bwd_launch_shape": lambda: rn._bwd_launch_shape(65536, 128, x.device),
 "is_contiguous": lambda: x.is_contiguous(),
}
for k, f in rows.items():
    print(f"{k:34s} {us(f):7.2f} us")
