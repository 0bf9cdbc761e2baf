"""A CPU stand-in for the torch_npu ops the NPU kernels call, written to their documented contracts.

torch_npu cannot run off Ascend hardware. Each op here is a ``torch.library`` operator in the
``engine_npu_standin`` namespace with a CPU kernel, a fake (meta) kernel so ``torch.compile`` traces it, and an
autograd formula **only where torch_npu has one** (op-plugin ``op_plugin/config/derivatives.yaml``):
``npu_rms_norm``, ``npu_swiglu`` and ``npu_rotary_mul`` differentiate through their ``*_backward`` ops as there;
``npu_grouped_matmul`` has no derivative in any release, and ``npu_moe_token_permute``/``unpermute`` have none
in release 7.1.0.x (they got one in 7.2.0): calling backward through them warns and silently yields no
gradient, exactly like torch_npu's autograd fallback, so a kernel that relies on autograd through them fails
its gradient tests here. (Kernels here compute those gradients themselves, so the stricter 7.1.0.x contract
is the one modelled.)

The CPU kernels check what the documents state (dtypes, ranks, layouts, group limits, value ranges) and
raise ``RuntimeError`` where the real op raises or where the documents leave the behaviour undefined.
Versions modelled: the 7.x documentation (rotary constraints, ``group_type`` required); ``__version__``
is ``2.7.1`` (release 7.2.0) by default and may be set in tests.

References (sources read for each op are summarised in ``/work/wt/torch_npu_ops.md``):
OP = Ascend/op-plugin (``codegen/templates/_op_plugin_docs.py``, ``docs/zh/custom_APIs/torch_npu/*.md``,
``op_plugin/config/{op_plugin_functions,derivatives}.yaml``, ``op_plugin/python/meta/_meta_registrations.py``,
``test/test_custom_ops/*``); OT = hicann/ops-transformer (CANN op READMEs).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

NAMESPACE = "engine_npu_standin"
DEFAULT_VERSION = "2.7.1"  # torch_npu build of release 7.2.0

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
FLOATS = (FP16, BF16, FP32)
RMS_NORM_DTYPES = {(FP16, FP32), (BF16, FP32), (FP16, FP16), (BF16, BF16), (FP32, FP32)}  # (x, gamma), A2/A3
GMM_DTYPES = {(FP16, FP16), (BF16, BF16), (FP32, FP32)}  # (x, weight), non-quantized
GMM_BIAS_DTYPE = {FP16: FP16, BF16: FP32, FP32: FP32}
GMM_MAX_GROUPS = 1024  # group_list length with one 3-D weight (group_type 0) or group_type 2
GMM_MAX_LIST = 128  # x / weight list length, and group_list length with a weight list
GMM_INNER_LIMIT = 65536  # the innermost dim of each x_i and weight_i must be below this
ROTARY_MAX_D = 896
ROTARY_MAX_BN = 1000
PERMUTE_MAX_INDICES = 16777215
PERMUTE_MAX_TOPK = 512

calls: Counter[str] = Counter()

_LIB = torch.library.Library(NAMESPACE, "DEF")


def _fail(op: str, message: str) -> RuntimeError:
    return RuntimeError(f"{op}: {message}")


def _define(schema: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Define ``schema`` with the decorated function as CPU kernel and ``fake`` as meta kernel; no autograd.

    The CPU kernel runs under ``no_grad`` like a device kernel: without a registered formula nothing inside
    it is recorded, so PyTorch's autograd fallback warns and drops the gradient, as for torch_npu's ops.
    The decorated function is returned unchanged (its docstring is the op's reference); ``op(name)`` is the
    registered operator that the ``torch_npu`` module object exposes.
    """
    name = schema.split("(", 1)[0]

    def register(compute: Callable[..., Any]) -> Callable[..., Any]:
        def cpu_kernel(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            with torch.no_grad():
                return compute(*args, **kwargs)

        _LIB.define(schema)
        _LIB.impl(name, cpu_kernel, "CPU")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
        return compute

    return register


def op(name: str) -> Any:
    """The registered stand-in operator ``engine_npu_standin::<name>``."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def _autograd(name: str, setup: Callable[..., None], backward: Callable[..., Any]) -> None:
    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup, lib=_LIB)


# ----------------------------------------------------------------------------------------------- npu_rms_norm
def _rms_norm_rstd_shape(x: torch.Tensor, gamma: torch.Tensor) -> list[int]:
    op = "npu_rms_norm"
    if not 2 <= x.dim() <= 8:
        raise _fail(op, f"self must have 2 to 8 dims, got {x.dim()}")
    lead = x.dim() - gamma.dim()
    if lead < 0 or tuple(gamma.shape) != tuple(x.shape[lead:]):
        raise _fail(op, f"gamma {tuple(gamma.shape)} must equal the trailing dims of self {tuple(x.shape)}")
    if (x.dtype, gamma.dtype) not in RMS_NORM_DTYPES:
        raise _fail(op, f"unsupported (self, gamma) dtypes ({x.dtype}, {gamma.dtype})")
    return [*x.shape[:lead], *([1] * gamma.dim())]


def _rms_norm_fake(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(_rms_norm_rstd_shape(x, gamma), dtype=FP32)


@_define("npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)", _rms_norm_fake)
def npu_rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x / sqrt(mean(x^2) + eps) * gamma`` over gamma's dims, in fp32; ``y`` in x's dtype, ``rstd`` fp32.

    OP ``docs/zh/custom_APIs/torch_npu/（beta）torch_npu-npu_rms_norm.md`` (formula, A2/A3 dtype pairs incl.
    fp16/bf16 x with fp32 gamma), ``op_plugin/utils/KernelNpuOutputSize.cpp`` ``rms_norm_npu_output_size``
    (rstd keeps x's leading dims, 1 for gamma's), ``test/test_custom_ops/test_npu_rms_norm.py``
    ``test_rms_norm_mix_dtype`` (reference computed in fp32, cast to x's dtype).
    """
    _rms_norm_rstd_shape(x, gamma)
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


def _rms_norm_backward_fake(
    dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), gamma.new_empty(gamma.shape, dtype=FP32)


@_define(
    "npu_rms_norm_backward(Tensor dy, Tensor self, Tensor gamma, Tensor rstd) -> (Tensor, Tensor)",
    _rms_norm_backward_fake,
)
def npu_rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dgamma)``: dx in x's dtype, dgamma **fp32** in gamma's shape.

    OP ``op_plugin/ops/opapi/RmsNormBackwardKernelOpApi.cpp`` (output allocation);
    ``test/test_custom_ops/test_npu_rms_norm_backward.py`` (reference formula).
    """
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xhat = x.float() * rstd
    g = dy.float() * gamma.float()
    dx = rstd * (g - xhat * (g * xhat).mean(dim=dims, keepdim=True))
    lead = tuple(range(x.dim() - gamma.dim()))
    return dx.to(x.dtype), (dy.float() * xhat).sum(dim=lead)


def _rms_norm_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, gamma, _ = inputs
    ctx.save_for_backward(x, gamma, output[1])


def _rms_norm_grad(ctx: Any, dy: torch.Tensor, _drstd: torch.Tensor) -> tuple[Any, ...]:
    """derivatives.yaml: ``self, gamma: npu_rms_norm_backward(grad, self, gamma, result1)``; rstd is not
    differentiable. The fp32 dgamma is cast to gamma's dtype, as the autograd engine does for the real op."""
    x, gamma, rstd = ctx.saved_tensors
    dx, dgamma = op("npu_rms_norm_backward")(dy, x, gamma, rstd)
    return dx, dgamma.to(gamma.dtype), None


_autograd("npu_rms_norm", _rms_norm_setup, _rms_norm_grad)


# ------------------------------------------------------------------------------------------------- npu_swiglu
def _swiglu_check(x: torch.Tensor, dim: int) -> list[int]:
    op = "npu_swiglu"
    if x.dtype not in FLOATS:
        raise _fail(op, f"unsupported dtype {x.dtype}")
    if not 1 <= x.dim() <= 8 or not -x.dim() <= dim < x.dim():
        raise _fail(op, f"self has {x.dim()} dims (1 to 8 allowed), dim {dim}")
    if x.numel() == 0 or not x.is_contiguous():
        raise _fail(op, "empty and non-contiguous tensors are not supported")
    if x.shape[dim] % 2:
        raise _fail(op, f"the size along dim ({x.shape[dim]}) must be even")
    shape = list(x.shape)
    shape[dim] //= 2
    return shape


def _swiglu_fake(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x.new_empty(_swiglu_check(x, dim))


@_define("npu_swiglu(Tensor self, int dim=-1) -> Tensor", _swiglu_fake)
def npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``swish(A) * B`` where A is the **first** half of x along ``dim`` and B the second; x's dtype.

    OP ``docs/zh/custom_APIs/torch_npu/（beta）torch_npu-npu_swiglu.md`` (formula, constraints: fp32/fp16/bf16,
    1-8 dims, even split, no non-contiguous or empty input); Ascend/pytorch
    ``torch_npu/_inductor/decomposition.py`` ``npu_swiglu`` (``silu(chunk[0]) * chunk[1]``).
    """
    _swiglu_check(x, dim)
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


@_define(
    "npu_swiglu_backward(Tensor grad_output, Tensor self, int dim=-1) -> Tensor",
    lambda grad_output, x, dim=-1: torch.empty_like(x),
)
def npu_swiglu_backward(grad_output: torch.Tensor, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Gradient of :func:`npu_swiglu` w.r.t. x, in x's shape and dtype (``aclnnSwiGluGrad``; formula as in
    Ascend/pytorch ``torch_npu/_inductor/decomposition.py`` ``npu_swiglu_backward``)."""
    a, b = x.float().chunk(2, dim=dim)
    g = grad_output.float()
    sig = torch.sigmoid(a)
    da = g * b * sig * (1 + a * (1 - sig))
    return torch.cat((da, g * a * sig), dim=dim).to(x.dtype)


def _swiglu_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.dim = inputs[1]


def _swiglu_grad(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """derivatives.yaml: ``self: npu_swiglu_backward(grad, self, dim)``."""
    (x,) = ctx.saved_tensors
    return op("npu_swiglu_backward")(grad, x, ctx.dim), None


_autograd("npu_swiglu", _swiglu_setup, _swiglu_grad)


# --------------------------------------------------------------------------------------------- npu_rotary_mul
def _rotate(x: torch.Tensor, mode: str) -> torch.Tensor:
    """half: ``cat(-x2, x1)`` of the two halves; interleave: ``rot[2i] = -x[2i+1], rot[2i+1] = x[2i]``.

    Written from torch_npu's documents, not imported from ``kinds/rope.py``: the stand-in must not share code
    with what it checks."""
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).reshape(x.shape)


def _rotary_layout_ok(x: torch.Tensor, r1: torch.Tensor, mode: str) -> bool:
    """Whether r1's broadcast shape is allowed for some layout of 4-D x (BNSD, BSND or SBND), within B/N limits.

    half: BNSD takes 11SD/B1SD/BNSD, BSND takes 1S1D/BS1D/BSND, SBND takes S11D/SB1D/SBND, B and N < 1000;
    interleave: only 11SD / 1S1D / S11D, and B*N < 1000.
    """
    a, b, c = x.shape[:3]
    r = tuple(r1.shape[:3])
    layouts = (  # (allowed r1 shapes for half, the one for interleave, B, N)
        ({(1, 1, c), (a, 1, c), (a, b, c)}, (1, 1, c), a, b),  # BNSD
        ({(1, b, 1), (a, b, 1), (a, b, c)}, (1, b, 1), a, c),  # BSND
        ({(a, 1, 1), (a, b, 1), (a, b, c)}, (a, 1, 1), b, c),  # SBND
    )
    for half_shapes, interleave_shape, batch, heads in layouts:
        if mode == "half" and r in half_shapes and batch < ROTARY_MAX_BN and heads < ROTARY_MAX_BN:
            return True
        if mode == "interleave" and r == interleave_shape and batch * heads < ROTARY_MAX_BN:
            return True
    return False


def _rotary_check(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, mode: str) -> None:
    op = "npu_rotary_mul"
    if mode not in ("half", "interleave"):
        raise _fail(op, f"rotary_mode must be 'half' or 'interleave', got {mode!r}")
    if any(t.dtype not in FLOATS for t in (x, r1, r2)):
        raise _fail(op, "x, r1 and r2 must be float16, bfloat16 or float32")
    if x.dim() != 4 or r1.dim() != 4 or r1.shape != r2.shape:
        raise _fail(op, f"x must be 4-D and r1/r2 4-D of one shape; got {tuple(x.shape)}, {tuple(r1.shape)}")
    d = x.shape[-1]
    if r1.shape[-1] != d or d % 2 or d >= ROTARY_MAX_D:
        raise _fail(
            op, f"last dim must be even, below {ROTARY_MAX_D} and equal in x and r1/r2 (x {d}, r {r1.shape[-1]})"
        )
    if not _rotary_layout_ok(x, r1, mode):
        raise _fail(op, f"r1/r2 shape {tuple(r1.shape)} is not an allowed broadcast of x {tuple(x.shape)} ({mode})")


def _rotary_fake(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    _rotary_check(x, r1, r2, rotary_mode)
    return torch.empty_like(x)


@_define("npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half') -> Tensor", _rotary_fake)
def npu_rotary_mul(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    """``x * r1 + rotate(x) * r2`` in x's shape and dtype; r1/r2 are first cast to x's dtype when they differ.

    OP ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_rotary_mul.md`` and ``_op_plugin_docs.py`` at 7.1.0
    (half and interleave formulas, 4-D x, layouts and r1/r2 broadcast shapes, D even and < 896, B/N < 1000,
    r1/r2 values in [-1, 1]); ``op_plugin/ops/opapi/RotaryMulKernelNpuOpApi.cpp`` (mixed dtypes: r1/r2 cast to
    x's dtype); ``test/test_custom_ops/test_npu_rotary_mul.py`` (``rotary_mul_mode`` interleave reference).
    """
    _rotary_check(x, r1, r2, rotary_mode)
    if bool((r1.abs() > 1).any()) or bool((r2.abs() > 1).any()):
        raise _fail("npu_rotary_mul", "r1/r2 values must lie in [-1, 1]")
    c, s = r1.to(x.dtype).float(), r2.to(x.dtype).float()
    x32 = x.float()
    return (x32 * c + _rotate(x32, rotary_mode) * s).to(x.dtype)


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _rotary_backward_fake(
    grad: torch.Tensor, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(grad), x.new_empty(r1.shape), x.new_empty(r2.shape)


@_define(
    "npu_rotary_mul_backward(Tensor grad, Tensor self, Tensor r1, Tensor r2, str rotary_mode='half') "
    "-> (Tensor, Tensor, Tensor)",
    _rotary_backward_fake,
)
def npu_rotary_mul_backward(
    grad: torch.Tensor, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dr1, dr2)``: dx in grad's shape, dr1/dr2 reduced to r1/r2's shapes, all in x's dtype.

    OP ``op_plugin/ops/opapi/RotaryMulBackwardKernelNpuOpApi.cpp`` and the meta registration
    ``npu_rotary_mul_backward``. The rotation is antisymmetric, so its transpose is ``-rotate``.
    """
    g = grad.float()
    c, s = r1.to(x.dtype).float(), r2.to(x.dtype).float()
    x32 = x.float()
    dx = g * c - _rotate(g * s, rotary_mode)
    dr1 = _reduce_to(g * x32, r1.shape)
    dr2 = _reduce_to(g * _rotate(x32, rotary_mode), r2.shape)
    return dx.to(x.dtype), dr1.to(x.dtype), dr2.to(x.dtype)


def _rotary_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, r1, r2, mode = inputs
    ctx.save_for_backward(x, r1, r2)
    ctx.mode = mode


def _rotary_grad(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """derivatives.yaml: ``self, r1, r2: npu_rotary_mul_backward(grad, self, r1, r2, rotary_mode)``."""
    x, r1, r2 = ctx.saved_tensors
    dx, dr1, dr2 = op("npu_rotary_mul_backward")(grad, x, r1, r2, ctx.mode)
    return dx, dr1.to(r1.dtype), dr2.to(r2.dtype), None


_autograd("npu_rotary_mul", _rotary_setup, _rotary_grad)


# ----------------------------------------------------------------------------------------- npu_grouped_matmul
def _row_major(t: torch.Tensor) -> bool:
    rows, cols = t.shape[-2], t.shape[-1]
    return (cols == 1 or t.stride(-1) == 1) and (rows == 1 or t.stride(-2) == cols)


def _transposed(t: torch.Tensor) -> bool:
    """The op's "transposed" tensor: shape [.., R, C] stored as [.., C, R] (strides [1, R] on the last two)."""
    rows, cols = t.shape[-2], t.shape[-1]
    return (rows == 1 or t.stride(-2) == 1) and (cols == 1 or t.stride(-1) == rows)


def _inner(t: torch.Tensor) -> int:
    """The innermost (memory-contiguous) dim the 65536 limit applies to."""
    return t.shape[-2] if _transposed(t) and not _row_major(t) else t.shape[-1]


def _gmm_shapes(
    x: Sequence[torch.Tensor],
    weight: Sequence[torch.Tensor],
    bias: Sequence[torch.Tensor] | None,
    group_list: torch.Tensor | None,
    split_item: int | None,
    group_type: int | None,
    group_list_type: int | None,
) -> list[list[int]]:
    """Check a call against the documented scenarios and return its output shapes."""
    op = "npu_grouped_matmul"
    if group_type is None:  # 7.1.0+: C++ TORCH_CHECK(group_type.has_value())
        raise _fail(op, "Requires manual passing group_type, current is None.")
    if split_item not in (0, 1, 2, 3):
        raise _fail(op, "Invalid value of split_item")
    if group_type not in (-1, 0, 2):
        raise _fail(op, f"group_type {group_type} is not supported (-1, 0 and 2 are)")
    if not x or not weight or len(x) > GMM_MAX_LIST or len(weight) > GMM_MAX_LIST:
        raise _fail(op, f"x and weight lists must hold 1 to {GMM_MAX_LIST} tensors")
    single = len(x) == 1 and len(weight) == 1 and split_item in (2, 3)
    for xi in x:
        for wi in weight:
            if (xi.dtype, wi.dtype) not in GMM_DTYPES or (xi.dtype == FP32 and not single):
                raise _fail(op, f"unsupported (x, weight) dtypes ({xi.dtype}, {wi.dtype})")
    if any(_inner(t) >= GMM_INNER_LIMIT for t in (*x, *weight)):
        raise _fail(op, f"the innermost dim of each x and weight must be below {GMM_INNER_LIMIT}")
    if bias is not None:
        if group_type == 2 or len(bias) != len(weight):
            raise _fail(op, "bias must be None for group_type 2 and match the weight list otherwise")
        if any(b.dtype != GMM_BIAS_DTYPE[x[0].dtype] for b in bias):
            raise _fail(op, f"bias for {x[0].dtype} x must be {GMM_BIAS_DTYPE[x[0].dtype]}")
    if group_list is not None:
        if group_list.dim() != 1 or group_list.dtype != torch.int64 or group_list.numel() == 0:
            raise _fail(op, "group_list must be a non-empty 1-D int64 tensor")
        if group_list_type not in (0, 1):  # 2 is for int8 x/weight only
            raise _fail(op, f"group_list_type {group_list_type} is not supported for float inputs")

    if group_type == -1:
        if group_list is not None or len(x) != len(weight):
            raise _fail(op, "group_type -1 takes no group_list and one weight per x")
        if any(not _row_major(xi) for xi in x) or any(w.dim() != 2 for w in weight):
            raise _fail(op, "group_type -1: x must not be transposed, weights must be 2-D")
        if any(xi.shape[-1] != w.shape[0] for xi, w in zip(x, weight, strict=True)):
            raise _fail(op, "x_i's last dim must equal weight_i's first")
        shapes = [[*xi.shape[:-1], w.shape[1]] for xi, w in zip(x, weight, strict=True)]
        if split_item in (2, 3):
            if len({s[-1] for s in shapes}) != 1 or any(len(s) != 2 for s in shapes):
                raise _fail(op, "a single output needs 2-D tensors with one N")
            return [[sum(s[0] for s in shapes), shapes[0][1]]]
        return shapes

    if group_list is None or len(x) != 1 or x[0].dim() != 2:
        raise _fail(op, f"group_type {group_type} needs one 2-D x and a group_list")
    if split_item not in (2, 3):
        raise _fail(op, f"group_type {group_type} with a tensor group_list is modelled for split_item 2/3 only")
    xs = x[0]
    groups = group_list.numel()
    if group_type == 0:
        if not _row_major(xs):
            raise _fail(op, "group_type 0: x must not be transposed")
        if len(weight) == 1 and weight[0].dim() == 3:
            w = weight[0]
            experts, k, n = w.shape
            if experts > GMM_MAX_GROUPS or groups != experts:
                raise _fail(op, f"group_list length {groups} must equal E={experts} (at most {GMM_MAX_GROUPS})")
            if not (_row_major(w) or _transposed(w)):
                raise _fail(op, "weight must be contiguous or transposed in its last two dims")
        else:
            if groups > GMM_MAX_LIST or groups != len(weight) or any(w.dim() != 2 for w in weight):
                raise _fail(op, f"a weight list needs 2-D weights, one per group (at most {GMM_MAX_LIST})")
            k, n = weight[0].shape
            if any(tuple(w.shape) != (k, n) for w in weight):
                raise _fail(op, "every weight of the list must have one shape")
        if xs.shape[1] != k:
            raise _fail(op, f"x's K ({xs.shape[1]}) must equal the weight's ({k})")
        return [[xs.shape[0], n]]
    # group_type 2: K-axis grouping, one 2-D transposed x [M, K], one 2-D row-major weight [K, N] -> [E, M, N]
    if len(weight) != 1 or weight[0].dim() != 2:
        raise _fail(op, "group_type 2 needs one 2-D weight")
    w = weight[0]
    if not _transposed(xs) or not _row_major(w):
        raise _fail(op, "group_type 2: x must be transposed and weight must not be")
    if groups > GMM_MAX_GROUPS or xs.shape[1] != w.shape[0]:
        raise _fail(op, f"x's K ({xs.shape[1]}) must equal weight's ({w.shape[0]}); at most {GMM_MAX_GROUPS} groups")
    return [[groups, xs.shape[0], w.shape[1]]]


def _group_sizes(op: str, group_list: torch.Tensor, group_list_type: int | None, total: int) -> list[int]:
    """Per-group sizes from ``group_list``, after the documented value checks (host reads: stand-in only)."""
    values = [int(v) for v in group_list]
    if group_list_type == 0:
        if any(v < 0 for v in values) or any(b < a for a, b in zip(values, values[1:], strict=False)):
            raise _fail(op, "a cumulative group_list must be non-negative and non-decreasing")
        if values[-1] != total:
            raise _fail(op, f"the last group_list value ({values[-1]}) must equal the grouped dim ({total})")
        return [b - a for a, b in zip([0, *values[:-1]], values, strict=True)]
    if any(v < 0 for v in values):
        raise _fail(op, "group sizes must be non-negative")
    if sum(values) != total:
        raise _fail(op, f"group sizes sum to {sum(values)}, the grouped dim is {total}")
    return values


def _gmm_fake(
    x: list[torch.Tensor],
    weight: list[torch.Tensor],
    *,
    bias: list[torch.Tensor] | None = None,
    group_list: torch.Tensor | None = None,
    split_item: int | None = 0,
    group_type: int | None = None,
    group_list_type: int | None = 0,
) -> list[torch.Tensor]:
    shapes = _gmm_shapes(x, weight, bias, group_list, split_item, group_type, group_list_type)
    return [x[0].new_empty(s) for s in shapes]


@_define(
    "npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor? group_list=None, "
    "int? split_item=0, int? group_type=None, int? group_list_type=0) -> Tensor[]",
    _gmm_fake,
)
def npu_grouped_matmul(
    x: list[torch.Tensor],
    weight: list[torch.Tensor],
    *,
    bias: list[torch.Tensor] | None = None,
    group_list: torch.Tensor | None = None,
    split_item: int | None = 0,
    group_type: int | None = None,
    group_list_type: int | None = 0,
) -> list[torch.Tensor]:
    """``y_i = x_i @ weight_i (+ bias_i)`` per group, in x's dtype. **No autograd in torch_npu.**

    group_type -1: lists of x and weight, no group_list. group_type 0 ("M" split): one 2-D x, not transposed,
    split by group_list along its rows over one 3-D weight [E, K, N] (at most 1024 groups; the weight may be
    transposed) or a weight list (at most 128); output [M, N]. group_type 2 ("K" split): one 2-D x that must be
    transposed, one 2-D weight that must not be, split along K; output [E, M, N]. group_list_type 0 is the
    cumulative sum, 1 the sizes; they must end at / sum to exactly the grouped dim. Only the Tensor
    ``group_list`` overload and non-quantized floats are modelled.

    OP ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_grouped_matmul.md`` (scenario tables for group_type -1/0/2,
    dtype table, InnerLimit 65536, list length 128, 1024 groups); ``op_plugin/ops/opapi/
    GroupedMatmulKernelNpuOpApi.cpp`` (split_item values, group_type required since 7.1.0);
    ``test/test_custom_ops/test_npu_grouped_matmul.py`` ``test_npu_grouped_matmul_1`` (M split) and ``_6``
    (K split); no entry in ``op_plugin/config/derivatives.yaml``.
    """
    _gmm_shapes(x, weight, bias, group_list, split_item, group_type, group_list_type)
    op = "npu_grouped_matmul"
    dtype = x[0].dtype
    if group_type == -1:
        outs = [
            (xi.float() @ w.float() + (bias[i].float() if bias is not None else 0)).to(dtype)
            for i, (xi, w) in enumerate(zip(x, weight, strict=True))
        ]
        return [torch.cat(outs, dim=0)] if split_item in (2, 3) else outs
    assert group_list is not None
    xs = x[0].float()
    if group_type == 0:
        sizes = _group_sizes(op, group_list, group_list_type, xs.shape[0])
        weights = weight[0].unbind(0) if len(weight) == 1 else weight
        chunks = xs.split(sizes, dim=0)
        outs = [
            c @ w.float() + (bias[i].float() if bias is not None else 0)
            for i, (c, w) in enumerate(zip(chunks, weights, strict=True))
        ]
        return [torch.cat(outs, dim=0).to(dtype)]
    sizes = _group_sizes(op, group_list, group_list_type, xs.shape[1])
    w = weight[0].float()
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    outs = [xs[:, a:b] @ w[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return [torch.stack(outs).to(dtype)]


# ------------------------------------------------------------------------- npu_moe_token_permute / unpermute
def _kept_rows(num_out_tokens: int | None, total: int) -> int:
    """``num_out_tokens``: None or 0 keeps all rows, a positive value at most that many, a negative one
    ``total + value`` (OP ``KernelNpuOutputSize.cpp`` ``npu_moe_token_permute_out_size``)."""
    if not num_out_tokens:
        return total
    return min(num_out_tokens, total) if num_out_tokens > 0 else max(num_out_tokens + total, 0)


def _permute_check(tokens: torch.Tensor, indices: torch.Tensor, padded_mode: bool) -> int:
    op = "npu_moe_token_permute"
    if padded_mode:
        raise _fail(op, "padded_mode must be False")
    if tokens.dim() != 2 or tokens.dtype != BF16:
        raise _fail(op, f"tokens must be 2-D bfloat16 (the only dtype documented), got {tokens.dtype}")
    if indices.dim() not in (1, 2) or indices.dtype not in (torch.int64, torch.int32):
        raise _fail(op, "indices must be a 1-D or 2-D int64/int32 tensor")
    top_k = indices.shape[1] if indices.dim() == 2 else 1
    if indices.shape[0] != tokens.shape[0] or top_k > PERMUTE_MAX_TOPK or indices.numel() >= PERMUTE_MAX_INDICES:
        raise _fail(op, f"indices {tuple(indices.shape)} must have one row per token, topK <= {PERMUTE_MAX_TOPK}")
    return top_k


def _permute_fake(
    tokens: torch.Tensor, indices: torch.Tensor, num_out_tokens: int | None = None, padded_mode: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    _permute_check(tokens, indices, padded_mode)
    rows = _kept_rows(num_out_tokens, indices.numel())
    return tokens.new_empty(rows, tokens.shape[1]), indices.new_empty(indices.numel(), dtype=torch.int32)


@_define(
    "npu_moe_token_permute(Tensor tokens, Tensor indices, int? num_out_tokens=None, bool padded_mode=False) "
    "-> (Tensor, Tensor)",
    _permute_fake,
)
def npu_moe_token_permute(
    tokens: torch.Tensor, indices: torch.Tensor, num_out_tokens: int | None = None, padded_mode: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of each token grouped by expert (stable): ``(permuted_tokens, sorted_indices)``.

    With ``s1 = argsort(indices.flatten(), stable)``: ``permuted_tokens = tokens[s1[:kept] // topK]`` and
    ``sorted_indices = argsort(s1)`` as int32, **all** ``indices.numel()`` of them (num_out_tokens truncates the
    permuted rows only): ``permuted_tokens[sorted_indices[t * topK + k]]`` is token t's copy for its k-th expert.
    No autograd before release 7.2.0.

    OT ``moe/moe_token_permute/README.md`` (``sortedIndicesOut = argSort(argSort(indices))``, INT32); OP
    ``test/test_custom_ops/test_npu_moe_token_permute_and_unpermute.py`` ``permute`` (two argsorts, ``s1[:num_out]``);
    ``_op_plugin_docs.py`` ``npu_moe_token_permute`` at 7.1.0 (bf16 tokens only, padded_mode False, limits);
    ``op_plugin/config/derivatives.yaml`` at 7.1.0 (no entry).
    """
    top_k = _permute_check(tokens, indices, padded_mode)
    flat = indices.reshape(-1)
    if bool((flat < 0).any()) or bool((flat >= PERMUTE_MAX_INDICES).any()):
        raise _fail("npu_moe_token_permute", f"indices must lie in [0, {PERMUTE_MAX_INDICES})")
    first = torch.argsort(flat, stable=True)
    kept = first[: _kept_rows(num_out_tokens, flat.numel())]
    return tokens.index_select(0, kept // top_k), torch.argsort(first, stable=True).to(torch.int32)


def _unpermute_check(
    permuted: torch.Tensor,
    sorted_indices: torch.Tensor,
    probs: torch.Tensor | None,
    padded_mode: bool,
    restore: Sequence[int] | None,
) -> int:
    op = "npu_moe_token_unpermute"
    if padded_mode or restore is not None:
        raise _fail(op, "padded_mode must be False (restore_shape is for padded mode only)")
    if permuted.dim() != 2 or permuted.dtype != BF16:
        raise _fail(op, f"permuted_tokens must be 2-D bfloat16 (the only dtype documented), got {permuted.dtype}")
    if sorted_indices.dim() != 1 or sorted_indices.dtype != torch.int32:
        raise _fail(op, "sorted_indices must be a 1-D int32 tensor (as npu_moe_token_permute returns it)")
    if probs is None:
        return 1
    if probs.dim() != 2 or probs.dtype != BF16 or probs.numel() != sorted_indices.numel():
        raise _fail(op, f"probs must be 2-D bfloat16 [tokens, topK] covering sorted_indices, got {tuple(probs.shape)}")
    return probs.shape[1]


def _unpermute_fake(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    probs: torch.Tensor | None = None,
    padded_mode: bool = False,
    restore_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    top_k = _unpermute_check(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape)
    return permuted_tokens.new_empty(sorted_indices.shape[0] // top_k, permuted_tokens.shape[1])


@_define(
    "npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, Tensor? probs=None, "
    "bool padded_mode=False, int[]? restore_shape=None) -> Tensor",
    _unpermute_fake,
)
def npu_moe_token_unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    probs: torch.Tensor | None = None,
    padded_mode: bool = False,
    restore_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """``out[i] = sum_j permuted_tokens[sorted_indices[i * topK + j]] * probs[i, j]`` (topK = probs.shape[1], or
    1 without probs), in permuted_tokens' dtype. No autograd before release 7.2.0.

    OT ``moe/moe_token_unpermute/README.md`` (formula); OP ``KernelNpuOutputSize.cpp``
    ``npu_moe_token_unpermute_out_size`` (rows = sorted_indices.size(0) // topK); ``_op_plugin_docs.py``
    ``npu_moe_token_unpermute`` at 7.1.0 (bf16, int32 indices, padded_mode False). An index past the permuted
    rows (num_out_tokens truncation) is undefined by the documents and raises here.
    """
    top_k = _unpermute_check(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape)
    rows = permuted_tokens.shape[0]
    if bool((sorted_indices < 0).any()) or bool((sorted_indices >= rows).any()):
        raise _fail("npu_moe_token_unpermute", f"sorted_indices point outside the {rows} permuted rows")
    picked = permuted_tokens.float().index_select(0, sorted_indices.long())
    picked = picked.view(-1, top_k, permuted_tokens.shape[1])
    if probs is not None:
        picked = picked * probs.float().unsqueeze(-1)
    return picked.sum(dim=1).to(permuted_tokens.dtype)


OPS = (
    "npu_rms_norm",
    "npu_rms_norm_backward",
    "npu_swiglu",
    "npu_swiglu_backward",
    "npu_rotary_mul",
    "npu_rotary_mul_backward",
    "npu_grouped_matmul",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
)


def build_module(version: str = DEFAULT_VERSION) -> types.ModuleType:
    """A fresh ``torch_npu`` module object exposing the stand-in ops (shared, process-wide operators)."""
    module = types.ModuleType("torch_npu")
    # A real module has a spec; importlib.util.find_spec("torch_npu") (accelerate, transformers) needs it.
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    module.__version__ = version  # type: ignore[attr-defined]
    module.__engine_standin__ = True  # type: ignore[attr-defined]
    for name in OPS:
        setattr(module, name, op(name))
    return module


@contextmanager
def torch_npu_standin(version: str = DEFAULT_VERSION) -> Iterator[types.ModuleType]:
    """Register the stand-in as ``torch_npu`` for the duration of the block."""
    previous = sys.modules.get("torch_npu")
    module = build_module(version)
    sys.modules["torch_npu"] = module
    calls.clear()
    try:
        yield module
    finally:
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous
