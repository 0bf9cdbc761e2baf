"""The low-overhead launch path: its cache key must separate every specialisation triton makes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the imports below follow it (E402): without triton the module skips

import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from engine.kernels.triton import launch as launch_module  # noqa: E402
from engine.kernels.triton.launch import _trailing_values, fast_launch, specialization_key  # noqa: E402
from engine.kernels.triton.ops.rms_norm import _rms_norm_fwd, rms_norm  # noqa: E402
from engine.kernels.triton.ops.rope import rope  # noqa: E402
from engine.kernels.triton.ops.swiglu import swiglu  # noqa: E402

GPU = torch.cuda.is_available()


def _triton_int_class(v: int) -> tuple:
    """What triton specialises an int argument on."""
    return v == 1, v % 16 == 0, -(2**31) <= v < 2**31, v < 2**63


def test_key_separates_alignment_dtype_and_every_int_specialisation():
    buf = torch.zeros(64)
    assert specialization_key([buf]) == specialization_key([buf[16:]])  # 64-byte offset: still aligned
    assert specialization_key([buf]) != specialization_key([buf[1:]])  # 4-byte offset: unaligned
    assert specialization_key([buf]) != specialization_key([buf.half()])
    assert specialization_key([torch.nn.Parameter(buf)]) == specialization_key([buf])
    ints = [0, 1, 2, 15, 16, 17, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**63 - 16, 2**63, -1, -16]
    for a in ints:
        for b in ints:
            if specialization_key([a]) == specialization_key([b]):
                assert _triton_int_class(a) == _triton_int_class(b), (a, b)
    for a, b in ((1, True), (0, False), (2, 2.0)):
        assert specialization_key([a]) != specialization_key([b]), (a, b)
    assert specialization_key([None]) is None
    assert specialization_key(["text"]) is None


def _kernel_signature(X, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GEMMA: tl.constexpr = False):
    pass


def test_trailing_values_follow_declaration_order_and_refuse_positional_constexprs():
    kernel = JITFunction(_kernel_signature)  # what @triton.jit builds off the interpreter
    meta = {"GEMMA": True, "BLOCK_N": 128, "BLOCK_M": 4, "num_warps": 4}
    assert _trailing_values(kernel, 2, meta) == (4, 128, True)
    assert _trailing_values(kernel, 2, {"BLOCK_M": 4, "BLOCK_N": 8}) == (4, 8, False)  # the default
    assert _trailing_values(kernel, 2, {"BLOCK_M": 4}) is None  # a constexpr left unset
    assert _trailing_values(kernel, 3, meta) is None  # BLOCK_M passed positionally


def test_interpreter_never_takes_the_fast_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fast_launch(True):
        assert not launch_module.fast_launch_enabled()


@pytest.mark.skipif(GPU, reason="checks the CPU/interpreter configuration")
def test_fast_path_is_off_under_the_interpreter_in_ci():
    assert not launch_module.fast_launch_enabled()


def test_installed_triton_launches_the_way_the_fast_path_expects():
    """Fails when a triton release changes JITFunction.run's launch call (the fast path would then stay off)."""
    assert launch_module._launch_path_matches()


def _outputs(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.grad is not None]


def _unaligned(shape, dtype):
    """A packed tensor whose data pointer is 2 bytes past a 16-byte boundary."""
    numel = torch.Size(shape).numel()
    return torch.randn(numel + 1, device="cuda", dtype=dtype)[1:].view(shape)


@pytest.mark.skipif(not GPU, reason="compiled launches need a GPU")
@pytest.mark.parametrize("aligned", [True, False])
def test_fast_and_normal_launches_agree_bit_for_bit(aligned):
    dtype = torch.bfloat16
    make = (lambda s: torch.randn(s, device="cuda", dtype=dtype)) if aligned else (lambda s: _unaligned(s, dtype))
    x, w = make((300, 136)), torch.randn(136, device="cuda", dtype=dtype)
    gate, up = make((70, 300)), make((70, 300))
    q, k = make((2, 4, 33, 64)), make((2, 2, 33, 64))
    cos, sin = torch.randn(1, 33, 64, device="cuda", dtype=dtype), torch.randn(1, 33, 64, device="cuda", dtype=dtype)
    cases = {
        "rms_norm": (lambda a, b: rms_norm(a, b, 1e-6), [x, w]),
        "swiglu": (swiglu, [gate, up]),
        "rope": (lambda a, b: rope(a, b, cos, sin), [q, k]),
    }
    for name, (fn, inputs) in cases.items():
        with fast_launch(False):
            want = _outputs(fn, inputs)
        with fast_launch(True):
            assert launch_module.fast_launch_enabled()
            first = _outputs(fn, inputs)  # fills the handle cache
            again = _outputs(fn, inputs)  # launches through the cached handle
        for a, b, c in zip(want, first, again, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c), name
    assert launch_module._caches.get(id(_rms_norm_fwd)), "the fast path never cached a compiled handle"


@pytest.mark.skipif(not GPU, reason="compiled launches need a GPU")
def test_pre_run_hooks_still_see_every_launch():
    from engine.kernels.triton.ops.swiglu import _swiglu_fwd

    seen = []

    def hook(*args, **kwargs):
        seen.append(1)

    gate, up = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
    _swiglu_fwd.add_pre_run_hook(hook)
    try:
        with fast_launch(True):
            for _ in range(3):
                swiglu(gate, up)
    finally:
        _swiglu_fwd.pre_run_hooks.remove(hook)
    assert len(seen) == 3
