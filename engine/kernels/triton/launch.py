"""Low-overhead Triton launches through the compiled kernel handle.

``kernel[grid](...)`` re-derives the kernel's specialisation in Python on every call (each argument's type,
16-byte alignment of pointers, ints equal to 1 or divisible by 16, int width). On the H100 machine that took
15-25 us of host time per launch, longer than many of these kernels run. ``launch`` keys its own cache on
the arguments (see ``specialization_key``), the constexprs and the launch options, and on a hit calls the
compiled handle exactly as ``JITFunction.run`` does (6-9 us there for the bare call). A miss, an argument
of another type, a constexpr passed positionally, a kernel with pre-run hooks, the interpreter, or a triton
whose launch call differs from the one checked here take the normal path. ``ENGINE_TRITON_FAST_LAUNCH=0``
turns the fast path off. Only eager launches on real tensors come here (``ops/library.run_kernel``): traced
launches (torch.compile, export) go through ``wrap_triton`` and Inductor's own launcher, never this cache.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from engine.kernels.triton.runtime import interpreting

# The launch call in JITFunction.run (triton 3.6 and 3.9) that the fast path reproduces.
_EXPECTED_LAUNCH = (
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,",
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
    "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())",
)
MAX_CACHED_PER_KERNEL = 4096

_enabled: bool | None = None  # decided on first use
_knobs: Any = None
_caches: dict[int, dict[tuple, tuple[Any, tuple]]] = {}


def _launch_path_matches() -> bool:
    """True when this triton launches compiled kernels the way the fast path does."""
    global _knobs
    try:
        import triton.knobs as knobs
        from triton.runtime.jit import JITFunction

        source = " ".join(inspect.getsource(JITFunction.run).split())
    except Exception:
        return False
    _knobs = knobs
    return all(" ".join(fragment.split()) in source for fragment in _EXPECTED_LAUNCH)


def fast_launch_enabled() -> bool:
    """Whether ``launch`` may use cached compiled handles (decided once: env switch, interpreter, triton)."""
    global _enabled
    if _enabled is None:
        wanted = os.environ.get("ENGINE_TRITON_FAST_LAUNCH", "1") != "0"
        _enabled = wanted and not interpreting() and _launch_path_matches()
    return _enabled


@contextlib.contextmanager
def fast_launch(enabled: bool) -> Iterator[None]:
    """Force the fast path on (where supported) or off inside the block; used by tests and benchmarks."""
    global _enabled
    previous = _enabled
    _enabled = enabled and not interpreting() and _launch_path_matches()
    try:
        yield
    finally:
        _enabled = previous


def specialization_key(args: Sequence[Any]) -> tuple | None:
    """A key that separates every specialisation triton makes of these runtime arguments; None if unsupported.

    Tensors contribute their dtype and 16-byte alignment. Ints contribute their exact value: triton specialises
    on ``== 1``, ``% 16 == 0`` and the i32/i64/u64 range, all functions of the value, so equal keys always mean
    equal specialisations (distinct values of one specialisation just take a cache slot each).
    """
    key: list[Any] = []
    append = key.append
    for arg in args:
        kind = type(arg)
        if kind is int:
            append(arg)
        elif kind is float:
            append(float)
        elif kind is bool:
            append((bool, arg))  # not the int 1 or 0: triton types bools as i1
        elif isinstance(arg, torch.Tensor):
            append((arg.dtype, arg.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(key)


def _trailing_values(kernel: Any, n_positional: int, meta: dict[str, Any]) -> tuple | None:
    """Values of the parameters after the positional ones, in declaration order (what JITFunction.run binds)."""
    params = kernel.params
    if len(params) < n_positional or any(p.is_constexpr for p in params[:n_positional]):
        return None
    values = []
    for param in params[n_positional:]:
        if param.name in meta:
            values.append(meta[param.name])
        elif param.default is not inspect.Parameter.empty:
            values.append(param.default)
        else:
            return None
    return tuple(values)


def _cacheable(compiled: Any) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata", "launch_metadata"))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``; constexprs and launch options go in ``meta``."""
    if not fast_launch_enabled() or getattr(kernel, "pre_run_hooks", None):  # hooks must see every launch
        kernel[grid](*args, **meta)
        return
    spec = specialization_key(args)
    if spec is None:
        kernel[grid](*args, **meta)
        return
    device = torch._C._cuda_getDevice()
    key = (device, spec, *meta.items())
    cache = _caches.get(id(kernel))
    if cache is None:
        cache = _caches[id(kernel)] = {}
    entry = cache.get(key)
    if entry is None:
        if len(cache) >= MAX_CACHED_PER_KERNEL:  # many distinct shapes (e.g. serving): start over
            cache.clear()
        compiled = kernel[grid](*args, **meta)
        trailing = _trailing_values(kernel, len(args), meta)
        if trailing is not None and _cacheable(compiled):
            cache[key] = (compiled, trailing)
        return
    compiled, trailing = entry
    full = (*args, *trailing)
    stream = torch._C._cuda_getCurrentRawStream(device)
    runtime = _knobs.runtime
    enter_hook = runtime.launch_enter_hook
    compiled.run(
        grid[0],
        grid[1] if len(grid) > 1 else 1,
        grid[2] if len(grid) > 2 else 1,
        stream,
        compiled.function,
        compiled.packed_metadata,
        None if enter_hook is None else compiled.launch_metadata(grid, stream, *full),
        enter_hook,
        runtime.launch_exit_hook,
        *full,
    )
