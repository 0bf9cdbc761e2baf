"""How every Triton kernel becomes a PyTorch operator ``engine::<name>``; the one place that decides how.

On a GPU the kernels are JIT kernels: each operator is a ``torch.library.triton_op``, so when it is traced
(``torch.compile``, export) its body is decomposed and every launch goes through ``wrap_triton``: Inductor
sees the kernels themselves and CUDA graphs capture them. Under ``TRITON_INTERPRET=1`` the kernels are
interpreter functions that ``wrap_triton`` cannot capture, so each operator is a ``custom_op`` instead, whose
fake implementation is the same body with its launches skipped (shapes only). Either way one Python body
computes the result and one pair of ``setup_context``/``backward`` functions is its registered autograd.

Eager calls skip the dispatcher: ``EAGER_PATH = "function"`` (the default) runs the body through a plain
``torch.autograd.Function`` built from the same functions; ``"op"`` (``ENGINE_TRITON_EAGER=op``) calls the
operator. On an H100 the operator path made the eager Qwen3-0.6B training step's fastest steps 13-16% longer.
Traced calls always take the operator. Eager launches are Triton's own ``kernel[grid](...)``: a launch cache
of our own saved about 5 us of host time per launch and nothing measurable in that training step, so it went.
Before torch 2.6 (no ``triton_op``) the GPU operators are ``custom_op``s too: still traced without graph
breaks, but opaque to Inductor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

from engine.kernels.triton.runtime import interpreting

NAMESPACE = "engine"
# Decided once, before any operator is defined (torch < 2.6 has no triton_op: opaque custom ops there).
USE_TRITON_OP = not interpreting() and hasattr(torch.library, "triton_op")
EagerPath = Literal["op", "function"]
# Eager calls skip the dispatcher by default (it only adds host time there); ENGINE_TRITON_EAGER=op routes them
# through the operator too.
EAGER_PATH: EagerPath = "op" if os.environ.get("ENGINE_TRITON_EAGER") == "op" else "function"

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_real(t: torch.Tensor) -> bool:
    """A tensor with data a kernel can read: not fake, functional, or meta (those only carry shapes)."""
    return type(t) in _PLAIN and not t.is_meta


def launch(kernel: Any, grid: tuple[Any, ...], *args: Any, **meta: Any) -> None:
    """Triton's own ``kernel[grid](*args, **meta)`` on real tensors: every eager launch passes here."""
    kernel[grid](*args, **meta)


def run_kernel(kernel: Any, grid: tuple[Any, ...], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` in whichever form the current call needs.

    Real tensors launch now. Traced tensors of a ``triton_op`` record the launch through ``wrap_triton``. A
    ``custom_op``'s fake call has nothing to launch. The first argument of every kernel here is a tensor, and
    one call never mixes real and traced tensors.
    """
    if is_real(args[0]):
        launch(kernel, grid, *args, **meta)
    elif USE_TRITON_OP:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


_unused: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def unused_pointer(like: torch.Tensor) -> torch.Tensor:
    """A stand-in for a pointer argument that this launch's constexpr branches never touch.

    Never pass another argument of the same launch instead: a traced launch (``wrap_triton``) treats every
    pointer argument as a tensor of its own, and two arguments naming one tensor could write back over each
    other. Eager calls share one cached element per device and dtype (nothing writes it).
    """
    real, key = is_real(like), (like.device, like.dtype)
    dummy = _unused.get(key) if real else None
    if dummy is None:
        dummy = torch.empty(1, dtype=like.dtype, device=like.device)
        if real and not (like.is_cuda and torch.cuda.is_current_stream_capturing()):  # keep no graph-pool memory
            _unused[key] = dummy
    return dummy


def _needs_grad(args: tuple[Any, ...]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(type(a) in _PLAIN and a.requires_grad for a in args)


class KernelOp:
    """The operator ``engine::<name>`` computed by ``impl``, with its autograd when ``backward`` is given.

    ``impl`` takes and returns only what an operator schema allows (tensors, floats, ints, bools, dtypes)
    and allocates every output itself. ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``
    follow ``torch.library.register_autograd``; the same two build the eager ``torch.autograd.Function``.
    """

    def __init__(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        setup_context: Callable[..., None] | None = None,
        backward: Callable[..., Any] | None = None,
    ) -> None:
        self.name = f"{NAMESPACE}::{name}"
        self.impl = impl
        if USE_TRITON_OP:
            self.op = torch.library.triton_op(self.name, impl, mutates_args=())
        else:
            self.op = torch.library.custom_op(self.name, impl, mutates_args=())
            self.op.register_fake(impl)
        self.overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        self.function: type[torch.autograd.Function] | None = None
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)
            self.function = _autograd_function(name, impl, setup_context, backward)

    def __call__(self, *args: Any) -> Any:
        # Every operator takes a tensor first, and one call never mixes real and traced tensors (run_kernel), so
        # the first argument's type tells an eager call from a traced one; this runs hundreds of times a step.
        if EAGER_PATH == "function" and type(args[0]) in _PLAIN and not torch.compiler.is_compiling():
            if self.function is not None and _needs_grad(args):
                return self.function.apply(*args)
            return self.impl(*args)
        return self.overload(*args)

    def __repr__(self) -> str:
        return f"<KernelOp {self.name}>"


def _autograd_function(
    name: str, impl: Callable[..., Any], setup_context: Callable[..., None] | None, backward: Callable[..., Any]
) -> type[torch.autograd.Function]:
    def forward(ctx: Any, *args: Any) -> Any:
        output = impl(*args)
        if setup_context is not None:
            setup_context(ctx, args, output)
        return output

    body = {"forward": staticmethod(forward), "backward": staticmethod(backward), "__doc__": f"engine::{name}"}
    return type(f"{name}_function", (torch.autograd.Function,), body)


@contextlib.contextmanager
def eager_path(path: EagerPath) -> Iterator[None]:
    """Take ``path`` for eager calls inside the block (benchmarks compare the two)."""
    global EAGER_PATH
    previous, EAGER_PATH = EAGER_PATH, path
    try:
        yield
    finally:
        EAGER_PATH = previous
