"""Kernel edge cases on a GPU (issue 12): a parametrization at least as broad as Liger-Kernel's op tests
(RMSNorm, SwiGLU, RoPE, Qwen2-VL MRoPE, fused MoE) plus non-powers of two, single rows, every dtype, strided
inputs and weights, skewed MoE routing and (only with ``ENGINE_GPU_HUGE=1``) tensors over 2**31 elements.

Every case runs our kernel and transformers' own code in the same dtype and compares both with a float64
reference. A tensor's error is its worst row's relative error (``worst_row_error``), so a dropped or garbage row
fails outright; ours must stay within ``RATIO * transformers + FLOOR``. That bound cannot fail on reference
noise (transformers meets the same noise) and cannot pass a lost row (error 1 against transformers' ~1e-3).

    pytest -m gpu tests/gpu/test_kernel_edge_cases.py
    ENGINE_GPU_HUGE=1 pytest tests/gpu/test_kernel_edge_cases.py -k over_2_31
    ENGINE_EDGE_LOG=benchmarks/results/edge_cases.jsonl pytest ...     # one JSON line per compared tensor

``ENGINE_EDGE_CASES_ON_CPU=1`` runs the cases through the Triton interpreter instead (slow; to check this file).
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from engine.kernels.kinds import mrope as mrope_kind
from engine.kernels.kinds import rope as rope_kind
from engine.kernels.kinds.base import NoOptions
from engine.kernels.kinds.mrope import MRopeOptions
from engine.kernels.kinds.swiglu import SwiGLUOptions
from tests.layouts import relayout

ON_CPU = os.environ.get("ENGINE_EDGE_CASES_ON_CPU") == "1"
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (GPU or ON_CPU), reason="needs a CUDA GPU")]
HUGE_ENV = "ENGINE_GPU_HUGE"
huge = pytest.mark.skipif(os.environ.get(HUGE_ENV) != "1", reason=f"needs ~40-60 GB of GPU memory; set {HUGE_ENV}=1")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RATIO = 2.0
# About 8 fp32 units of rounding: the kernels compute in fp32, and in fp32 cases transformers' own error is a unit or
# two, which another valid summation order (times a row's conditioning) can exceed twice over. Far below any bf16 or
# fp16 error, and below Liger's fp32 tolerances (1e-5 forward, 1e-2 MoE backward) by 10x or more.
FLOOR = 1e-6
TYPICAL_ROW = 0.5
LOG_ENV = "ENGINE_EDGE_LOG"


# --- comparison -----------------------------------------------------------------------------------------------


def worst_row_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest over rows (all dims but the last) of ``|got - exact| / scale``; any non-finite value is infinite.

    A row's scale is its own reference norm, but at least ``TYPICAL_ROW`` times the root-mean-square row norm:
    a row whose reference nearly cancels (a routing-weight gradient is one dot product per row) is judged
    against the tensor's typical size rather than its own accident, while a dropped or garbage row of normal
    size still scores about 1. All-zero references fall back to the absolute error.
    """
    if got.shape != exact.shape:
        return math.inf
    if not bool(torch.isfinite(got).all()):
        return math.inf
    width = got.shape[-1] if got.dim() else 1
    g = got.detach().to(torch.float64).reshape(-1, width)
    e = exact.detach().to(torch.float64).reshape(-1, width)
    if g.numel() == 0:
        return 0.0
    diff, norms = (g - e).norm(dim=1), e.norm(dim=1)
    scale = norms.clamp_min(TYPICAL_ROW * float(norms.square().mean().sqrt()))
    return float(torch.where(scale > 0, diff / scale.clamp_min(1e-300), diff).max())


class Comparison:
    """Errors of ours and transformers' against float64 for each tensor of one case, checked and logged at once."""

    def __init__(self, case: str, dtype: torch.dtype) -> None:
        self.case, self.dtype, self.rows = case, dtype, []

    def add(self, name: str, ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
        self.add_errors(name, worst_row_error(ours, exact), worst_row_error(theirs, exact))

    def add_errors(self, name: str, ours: float, theirs: float) -> None:
        bound = RATIO * theirs + FLOOR
        self.rows.append(
            {
                "case": self.case,
                "tensor": name,
                "dtype": str(self.dtype).removeprefix("torch."),
                "ours": ours,
                "transformers": theirs,
                "ratio": ours / theirs if theirs > 0 else (0.0 if ours == 0 else math.inf),
                "bound": bound,
                "passed": ours <= bound,
                "device": torch.cuda.get_device_name() if GPU else "cpu (interpreter)",
            }
        )

    def check(self) -> None:
        path = os.environ.get(LOG_ENV)
        if path:
            with open(path, "a") as log:
                for row in self.rows:
                    log.write(json.dumps(row) + "\n")
        failed = [
            f"{r['tensor']}: ours {r['ours']:.3e} > bound {r['bound']:.3e} (transformers {r['transformers']:.3e})"
            for r in self.rows
            if not r["passed"]
        ]
        assert not failed, f"{self.case} {self.dtype}: " + "; ".join(failed)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, dtype=torch.float32, scale: float = 1.0, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    values = torch.randn(*shape, device=DEVICE, generator=seeded(seed)) * scale + shift
    return values.to(dtype)


def forward_backward(fn, inputs, grad_of, upstream=None, exact: bool = False):
    """(outputs, gradients of ``inputs[i]`` for i in grad_of, upstream gradients used).

    Inputs keep their strides (leaves share their storage). ``upstream`` defaults to seeded normals in each
    output's dtype; ``exact`` runs everything in float64 with the same input and upstream values.
    """
    cast = (lambda t: t.detach().to(torch.float64)) if exact else (lambda t: t.detach())
    leaves = [cast(t).requires_grad_(i in grad_of) if t.is_floating_point() else t for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    if upstream is None:
        upstream = [randn(*o.shape, dtype=o.dtype, seed=100 + i) for i, o in enumerate(outs)]
    if grad_of:
        pairs = [(o, u.to(o.dtype)) for o, u in zip(outs, upstream, strict=True) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
    return [o.detach() for o in outs], [leaves[i].grad for i in grad_of], upstream


def compare_fwd_bwd(case, dtype, names, ours_fn, theirs_fn, exact_fn, inputs, grad_of) -> None:
    ours, ours_grads, upstream = forward_backward(ours_fn, inputs, grad_of)
    theirs, theirs_grads, _ = forward_backward(theirs_fn, inputs, grad_of, upstream)
    exact, exact_grads, _ = forward_backward(exact_fn, inputs, grad_of, upstream, exact=True)
    comparison = Comparison(case, dtype)
    for name, a, b, e in zip(names, ours + ours_grads, theirs + theirs_grads, exact + exact_grads, strict=True):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        comparison.add(name, a, b, e)
    comparison.check()


def case_id(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value).removeprefix("torch.")


# --- RMSNorm --------------------------------------------------------------------------------------------------

RMS_SHAPES = [
    (2, 128, 512),  # Liger
    (5, 123, 123),  # Liger, odd
    (2, 2, 8),  # Liger functional
    (9, 7, 41),  # Liger functional, odd
    (1, 4096),  # one row
    (1, 1, 7),  # one row, tiny odd width
    (3, 4097),  # just past a power of two
    (4, 65536),  # widest row the kernel takes
    (16384, 128),  # many narrow rows (q/k norm), tail-reduced weight gradient
    (37, 2048),
]
RMS_MODES = {"llama": (0.0, "llama"), "gemma": (1.0, "gemma")}  # Llama/Qwen and Gemma (1 + w) conventions
EPS = 1e-6


def rms_norm_exact(x: torch.Tensor, w: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """The math both casting conventions round differently, with no rounding of its own (in float64)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (w + offset)


def transformers_rms_norm(casting: str, width: int) -> nn.Module:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = GemmaRMSNorm(width, eps=EPS) if casting == "gemma" else LlamaRMSNorm(width, eps=EPS)
    return module.to(DEVICE)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("mode", list(RMS_MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=case_id)
def test_rms_norm(shape, dtype, mode, layout):
    from engine.kernels.triton.ops.rms_norm import rms_norm

    offset, casting = RMS_MODES[mode]
    width = shape[-1]
    x = randn(*shape, dtype=dtype)
    w = randn(width, dtype=dtype, scale=0.1, shift=1.0 - offset, seed=1)
    if layout == "strided":  # rows of a wider buffer, and a weight read every other element (w_big[::2])
        x, w = relayout(x, "row_padded"), relayout(w, "every_other")
    elif layout == "transposed" and x.dim() > 1 and x.shape[0] > 1:
        x = relayout(x, "transposed")
    module = transformers_rms_norm(casting, width)
    compare_fwd_bwd(
        f"rms_norm {case_id(shape)} {mode} {layout}",
        dtype,
        ["y", "dx", "dw"],
        lambda x_, w_: rms_norm(x_, w_, EPS, offset, casting == "gemma"),
        lambda x_, w_: functional_call(module, {"weight": w_}, (x_,)),
        lambda x_, w_: rms_norm_exact(x_, w_, offset),
        [x, w],
        (0, 1),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=case_id)
def test_rms_norm_fp32_weight_promotes_like_transformers(dtype):
    from engine.kernels.triton.ops.rms_norm import rms_norm

    module = transformers_rms_norm("llama", 1024)
    x, w = randn(64, 1024, dtype=dtype), randn(1024, scale=0.1, shift=1.0, seed=1)
    compare_fwd_bwd(
        "rms_norm fp32 weight",
        dtype,
        ["y", "dx", "dw"],
        lambda x_, w_: rms_norm(x_, w_, EPS),
        lambda x_, w_: functional_call(module, {"weight": w_}, (x_,)),
        rms_norm_exact,
        [x, w],
        (0, 1),
    )


# --- SwiGLU ---------------------------------------------------------------------------------------------------

SWIGLU_SHAPES = [
    (2, 8, 8),  # Liger functional
    (9, 7, 41),  # Liger functional, odd
    (2, 256, 512),  # Liger MLP grid (intermediate)
    (6, 42, 431),  # Liger MLP grid, odd
    (1, 11009),  # Liger tiled cases: ragged vs 1024-aligned columns
    (3, 14337),
    (4, 16384),
    (1, 1),  # one element
]


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from transformers.activations import ACT2FN

    return ACT2FN["silu"](gate) * up


@pytest.mark.parametrize("layout", ["contiguous", "fused_chunk", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=case_id)
def test_swiglu(shape, dtype, layout):
    from engine.kernels.triton.ops.swiglu import swiglu

    gate, up = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    if layout == "fused_chunk":  # halves of one gate_up projection output (Phi-3 style), row-strided views
        gate, up = torch.cat([gate, up], dim=-1).chunk(2, dim=-1)
    elif layout == "transposed" and gate.dim() > 1 and gate.shape[0] > 1:
        gate, up = relayout(gate, "transposed"), relayout(up, "transposed")
    compare_fwd_bwd(
        f"swiglu {case_id(shape)} {layout}",
        dtype,
        ["out", "d_gate", "d_up"],
        swiglu,
        _silu_mul,
        lambda g, u: F.silu(g) * u,
        [gate, up],
        (0, 1),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("bsz,seq,hidden,inter", [(2, 256, 256, 512), (6, 42, 123, 431)])
def test_swiglu_mlp_kernel_class(bsz, seq, hidden, inter, dtype):
    """The kernel class on transformers' LlamaMLP (Liger's MLP grid): output, input and weight gradients."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from engine.kernels.triton.swiglu import TritonSwiGLUKernel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1, head_dim=64)
    base = LlamaMLP(config).to(DEVICE)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, p.shape[1] ** -0.5)
    x = randn(bsz, seq, hidden, dtype=dtype)
    modules = {name: copy.deepcopy(base).to(dtype) for name in ("ours", "theirs")}
    modules["exact"] = copy.deepcopy(base).to(torch.float64)
    calls = {
        "ours": lambda x_: TritonSwiGLUKernel.run(modules["ours"], SwiGLUOptions(), x_),
        "theirs": modules["theirs"],
        "exact": modules["exact"],
    }
    results, upstream = {}, None
    for name, call in calls.items():
        outs, grads, upstream = forward_backward(call, [x], (0,), upstream, exact=name == "exact")
        projections = ("gate_proj", "up_proj", "down_proj")
        results[name] = outs + grads + [getattr(modules[name], p).weight.grad for p in projections]
    comparison = Comparison(f"swiglu LlamaMLP {bsz}x{seq} {hidden}/{inter}", dtype)
    names = ["y", "dx", "d_gate_proj", "d_up_proj", "d_down_proj"]
    for name, a, b, e in zip(names, results["ours"], results["theirs"], results["exact"], strict=True):
        comparison.add(name, a, b, e)
    comparison.check()


# --- RoPE -----------------------------------------------------------------------------------------------------

ROPE_SHAPES = [  # (batch, seq, q heads, kv heads, head_dim)
    (1, 128, 32, 32, 64),  # Liger
    (2, 128, 32, 32, 64),
    (1, 128, 32, 8, 64),  # GQA
    (2, 128, 32, 8, 64),
    (3, 423, 73, 213, 92),  # odd shapes, more kv heads than q heads
    (3, 423, 73, 155, 92),
    (1, 8192, 32, 8, 128),  # long sequence
    (1, 1, 1, 1, 2),  # one position, one head, smallest head_dim
    (2, 3, 5, 3, 16),
]


def cos_sin(batch: int, seq: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' default rotary cos/sin (fp32 math, cast to the activations' dtype), [batch, seq, dim]."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=DEVICE, dtype=torch.float32) / dim))
    positions = torch.arange(seq, device=DEVICE, dtype=torch.float32) + 7.0
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None].expand(batch, -1, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("layout", ["bshd_view", "contiguous", "strided"])
@pytest.mark.parametrize("expand_batch", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=case_id)
def test_rope(shape, dtype, expand_batch, layout):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from engine.kernels.triton.ops.rope import rope

    batch, seq, hq, hk, dim = shape
    if layout == "bshd_view":  # how attention layers produce them: [B, S, H, D] transposed to [B, H, S, D]
        q = randn(batch, seq, hq, dim, dtype=dtype).transpose(1, 2)
        k = randn(batch, seq, hk, dim, dtype=dtype, seed=1).transpose(1, 2)
    else:
        q, k = randn(batch, hq, seq, dim, dtype=dtype), randn(batch, hk, seq, dim, dtype=dtype, seed=1)
    cos, sin = cos_sin(batch if expand_batch else 1, seq, dim, dtype)
    if layout == "strided":
        q, k = relayout(q, "every_other"), relayout(k, "every_other")
        cos, sin = relayout(cos, "row_padded"), relayout(sin, "row_padded")
    compare_fwd_bwd(
        f"rope {case_id(shape)} {'B' if expand_batch else '1'}-batch cos {layout}",
        dtype,
        ["q", "k", "dq", "dk"],
        lambda q_, k_, c, s: rope(q_, k_, c, s),
        apply_rotary_pos_emb,
        apply_rotary_pos_emb,
        [q, k, cos, sin],
        (0, 1),
    )


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("angles", ["float32", "same"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", [(128, 32, 64), (256, 16, 128), (423, 73, 92), (1, 1, 2)], ids=case_id)
def test_vision_rope(shape, dtype, angles, layout):
    """Qwen2-VL's vision tower: q/k [S, H, D], 2-D cos/sin (fp32 in the model, or the activations' dtype)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    from engine.kernels.triton.ops.rope import vision_rope

    seq, heads, dim = shape
    q, k = randn(seq, heads, dim, dtype=dtype), randn(seq, heads, dim, dtype=dtype, seed=1)
    cos, sin = cos_sin(1, seq, dim, torch.float32 if angles == "float32" else dtype)
    cos, sin = cos[0], sin[0]
    if layout == "strided":
        q, k, cos, sin = (relayout(t, "every_other") for t in (q, k, cos, sin))
    compare_fwd_bwd(
        f"vision_rope {case_id(shape)} {angles} angles {layout}",
        dtype,
        ["q", "k", "dq", "dk"],
        vision_rope,
        apply_rotary_pos_emb_vision,
        lambda q_, k_, c, s: rope_kind.reference(q_, k_, c, s, unsqueeze_dim=1),
        [q, k, cos, sin],
        (0, 1),
    )


# --- multimodal RoPE cos/sin ----------------------------------------------------------------------------------

MROPE_LAYOUTS = [  # (layout, head_dim, mrope_section)
    ("sectioned", 128, [16, 24, 24]),  # Liger's three Qwen2-VL cases
    ("sectioned", 96, [16, 16, 16]),
    ("sectioned", 64, [8, 12, 12]),
    ("interleaved", 128, [24, 20, 20]),  # Qwen3-VL
    ("interleaved", 64, [12, 10, 10]),
]


def mrope_module(layout: str, head_dim: int, section: list[int]) -> nn.Module:
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    if layout == "sectioned":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

        config = Qwen2VLTextConfig(hidden_size=8 * head_dim, num_attention_heads=8, rope_parameters=rope)
        return Qwen2VLRotaryEmbedding(config).to(DEVICE)
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRotaryEmbedding

    interleaved = dict(rope, mrope_interleaved=True)
    config = Qwen3VLMoeTextConfig(
        hidden_size=8 * head_dim, num_attention_heads=8, head_dim=head_dim, rope_parameters=interleaved
    )
    return Qwen3VLMoeTextRotaryEmbedding(config).to(DEVICE)


@pytest.mark.parametrize("positions", ["liger_arange", "random"])
@pytest.mark.parametrize("bsz,seq", [(1, 128), (2, 131)])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("layout,head_dim,section", MROPE_LAYOUTS, ids=lambda v: case_id(v) if v else None)
def test_mrope_cos_sin(layout, head_dim, section, dtype, bsz, seq, positions):
    from engine.kernels.triton.mrope import TritonMRoPEKernel

    module = mrope_module(layout, head_dim, section)
    if positions == "liger_arange":  # not a realistic distribution, but large and distinct per axis
        pos = torch.arange(seq * 3 * bsz, device=DEVICE).view(3, bsz, seq)
    else:
        pos = torch.randint(0, 4096, (3, bsz, seq), device=DEVICE, generator=seeded(0))
    x = torch.empty(1, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ours = TritonMRoPEKernel.run(module, MRopeOptions(layout=layout), x, pos)
        theirs = module(x, pos)
    table = mrope_kind.axis_table(head_dim // 2, section, layout).to(DEVICE)
    freqs = pos.to(torch.float64)[..., None] * module.inv_freq.to(torch.float64)  # [3, B, T, D/2]
    picked = freqs.gather(0, table.long().view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
    emb = torch.cat((picked, picked), dim=-1)
    exact = (emb.cos() * module.attention_scaling, emb.sin() * module.attention_scaling)
    comparison = Comparison(f"mrope {layout} d{head_dim} B{bsz} T{seq} {positions}", dtype)
    for name, a, b, e in zip(["cos", "sin"], ours, theirs, exact, strict=True):
        assert a.dtype == b.dtype == dtype
        comparison.add(name, a, b, e)
    comparison.check()


# --- fused MoE ------------------------------------------------------------------------------------------------

MOE_CASES = {  # name: (tokens, experts, hidden, intermediate, top_k, routing)
    "T7 E4 H64 I32 K2": (7, 4, 64, 32, 2, "softmax"),  # Liger: T smaller than a tile
    "T512 E8 H256 I128 K2": (512, 8, 256, 128, 2, "softmax"),
    "T512 E8 H97 I47 K2": (512, 8, 97, 47, 2, "softmax"),  # odd H / I
    "T512 E7 H128 I64 K3": (512, 7, 128, 64, 3, "softmax"),  # prime E
    "T512 E8 H256 I64 K1": (512, 8, 256, 64, 1, "softmax"),
    "T128 E8 H256 I64 K8": (128, 8, 256, 64, 8, "softmax"),  # K = E
    "all to expert 0": (32, 8, 64, 32, 2, "one"),
    "one token": (1, 8, 64, 32, 2, "softmax"),
    "T16 E4 K4": (16, 4, 64, 32, 4, "softmax"),
    "one expert": (64, 1, 64, 32, 1, "softmax"),
    "E256 K8": (1024, 256, 128, 64, 8, "softmax"),
    "tile height 128": (4096, 8, 256, 128, 2, "softmax"),  # rows >= 256 per expert
    "skewed E64 K4": (2048, 64, 192, 96, 4, "skewed"),  # most experts idle, a few hot
    "H4160 I200 skewed": (256, 16, 4160, 200, 2, "skewed"),  # hidden / intermediate past any tile multiple
    "T65536 E128 K8 skewed": (65536, 128, 256, 64, 8, "skewed"),  # the most tokens, in every dtype (fp32 too)
}


def moe_module(experts: int, hidden: int, inter: int, top_k: int, real: bool = False) -> nn.Module:
    """transformers' Qwen3MoeExperts with its eager loop; weights on ``meta`` unless ``real`` (callers that pass
    the weights through ``functional_call`` need none of their own)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k
    )
    config._experts_implementation = "eager"  # transformers' reference loop
    with torch.device(DEVICE if real else "meta"):
        return Qwen3MoeExperts(config)


def moe_inputs(tokens, experts, hidden, inter, top_k, routing, dtype, seed=0):
    x = randn(tokens, hidden, dtype=dtype, seed=seed)
    gate_up = randn(experts, 2 * inter, hidden, dtype=dtype, scale=hidden**-0.5, seed=seed + 1)
    down = randn(experts, hidden, inter, dtype=dtype, scale=inter**-0.5, seed=seed + 2)
    logits = torch.randn(tokens, experts, device=DEVICE, generator=seeded(seed + 3))
    if routing == "skewed":  # a router early in training: a few experts take most tokens
        logits = logits + torch.linspace(0, 6, experts, device=DEVICE)
    weights, index = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    if routing == "one":
        index = torch.zeros_like(index)
    return x, gate_up, down, index, weights


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_fused_moe(case, dtype, layout):
    from engine.kernels.triton.ops.moe import fused_moe

    tokens, experts, hidden, inter, top_k, routing = MOE_CASES[case]
    x, gate_up, down, index, weights = moe_inputs(tokens, experts, hidden, inter, top_k, routing, dtype)
    if layout == "strided":  # every argument non-contiguous: padded rows, transposed storage, strided columns
        x, gate_up, down = relayout(x, "row_padded"), relayout(gate_up, "transposed"), relayout(down, "every_other")
        index, weights = relayout(index, "transposed"), relayout(weights, "every_other")
    module = moe_module(experts, hidden, inter, top_k)

    def transformers_experts(x_, gate_up_, down_, index_, weights_):
        return functional_call(module, {"gate_up_proj": gate_up_, "down_proj": down_}, (x_, index_, weights_))

    compare_fwd_bwd(
        f"fused_moe {case} {layout}",
        dtype,
        ["out", "dx", "d_gate_up_proj", "d_down_proj", "d_top_k_weights"],
        fused_moe,
        transformers_experts,
        transformers_experts,
        [x, gate_up, down, index, weights],
        (0, 1, 2, 4),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("case", ["T7 E4 H64 I32 K2", "T512 E8 H256 I128 K2"])
def test_fused_moe_kernel_class(case, dtype):
    """The kernel class on transformers' Qwen3MoeExperts (fp32 failed to compile before: issue 12)."""
    from engine.kernels.triton.fused_moe import TritonFusedMoEKernel

    tokens, experts, hidden, inter, top_k, routing = MOE_CASES[case]
    x, gate_up, down, index, weights = moe_inputs(tokens, experts, hidden, inter, top_k, routing, dtype)
    base = moe_module(experts, hidden, inter, top_k, real=True)
    modules = {name: copy.deepcopy(base).to(dtype) for name in ("ours", "theirs")}
    modules["exact"] = copy.deepcopy(base).to(torch.float64)
    for module in modules.values():
        with torch.no_grad():
            module.gate_up_proj.copy_(gate_up)
            module.down_proj.copy_(down)
    calls = {
        "ours": lambda x_, w_: TritonFusedMoEKernel.run(modules["ours"], NoOptions(), x_, index, w_),
        "theirs": lambda x_, w_: modules["theirs"](x_, index, w_),
        "exact": lambda x_, w_: modules["exact"](x_, index, w_),
    }
    results, upstream = {}, None
    for name, call in calls.items():
        outs, grads, upstream = forward_backward(call, [x, weights], (0, 1), upstream, exact=name == "exact")
        results[name] = outs + grads + [modules[name].gate_up_proj.grad, modules[name].down_proj.grad]
    comparison = Comparison(f"TritonFusedMoEKernel {case}", dtype)
    names = ["out", "dx", "d_top_k_weights", "d_gate_up_proj", "d_down_proj"]
    for name, a, b, e in zip(names, results["ours"], results["theirs"], results["exact"], strict=True):
        comparison.add(name, a, b, e)
    comparison.check()


# --- over 2**31 elements ----------------------------------------------------------------------------------------


HUGE_RMS_NORM = (262145, 8192)  # rows, width: 2.15e9 elements
HUGE_MOE = (65536, 128, 4160, 768, 8)  # tokens, experts, hidden, intermediate, top-k: [T*K, H] is 2.18e9 elements
assert HUGE_RMS_NORM[0] * HUGE_RMS_NORM[1] > 2**31 and HUGE_MOE[0] * HUGE_MOE[4] * HUGE_MOE[2] > 2**31


class RowErrors:
    """Worst-row errors accumulated chunk by chunk (the float64 reference never exists whole)."""

    def __init__(self) -> None:
        self.worst: dict[str, float] = {}

    def add(self, name: str, got: torch.Tensor, exact: torch.Tensor) -> None:
        self.worst[name] = max(self.worst.get(name, 0.0), worst_row_error(got, exact))


@huge
def test_rms_norm_over_2_31_elements():
    """262145 x 8192 bf16 (issue 12): transformers' LlamaRMSNorm first (its autograd peaks near 60 GB), then ours,
    then a float64 reference in row chunks; outputs are kept in bf16 only."""
    from engine.kernels.triton.ops.rms_norm import rms_norm

    (rows, width), dtype = HUGE_RMS_NORM, torch.bfloat16
    x = randn(rows, width, dtype=dtype)
    w = randn(width, dtype=dtype, scale=0.1, shift=1.0, seed=1)
    dy = randn(rows, width, dtype=dtype, seed=2)
    module = transformers_rms_norm("llama", width)
    results = {}
    for name, fn in (
        ("theirs", lambda x_, w_: functional_call(module, {"weight": w_}, (x_,))),
        ("ours", lambda x_, w_: rms_norm(x_, w_, EPS)),
    ):
        (y,), (dx, dw), _ = forward_backward(fn, [x, w], (0, 1), [dy])
        results[name] = (y, dx, dw)
        torch.cuda.empty_cache()
    errors = {name: RowErrors() for name in results}
    dw_exact = torch.zeros(width, dtype=torch.float64, device=DEVICE)
    chunk = 8192 if GPU else 16
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        (y64,), (dx64, dw64), _ = forward_backward(rms_norm_exact, [x[part], w], (0, 1), [dy[part]], exact=True)
        dw_exact += dw64
        for name, (y, dx, _) in results.items():
            errors[name].add("y", y[part], y64)
            errors[name].add("dx", dx[part], dx64)
    for name, (_, _, dw) in results.items():
        errors[name].add("dw", dw, dw_exact)
    comparison = Comparison("rms_norm 262145x8192 (>2**31)", dtype)
    for tensor in ("y", "dx", "dw"):
        comparison.add_errors(tensor, errors["ours"].worst[tensor], errors["theirs"].worst[tensor])
    comparison.check()


@huge
def test_fused_moe_over_2_31_elements():
    """T=65536, H=4160, top-8 of 128 experts, I=768, bf16 (issue 12): the [T*K, H] row buffers hold 2.2e9
    elements. transformers' eager experts and ours, then a float64 reference in token chunks."""
    from engine.kernels.triton.ops.moe import fused_moe

    (tokens, experts, hidden, inter, top_k), dtype = HUGE_MOE, torch.bfloat16
    x, gate_up, down, index, weights = moe_inputs(tokens, experts, hidden, inter, top_k, "skewed", dtype)
    module = moe_module(experts, hidden, inter, top_k)

    def transformers_experts(x_, gate_up_, down_, weights_):
        return functional_call(module, {"gate_up_proj": gate_up_, "down_proj": down_}, (x_, index, weights_))

    upstream = [randn(tokens, hidden, dtype=dtype, seed=100)]
    results = {}
    for name, fn in (
        ("theirs", transformers_experts),
        ("ours", lambda x_, gu, dn, w_: fused_moe(x_, gu, dn, index, w_)),
    ):
        (out,), grads, _ = forward_backward(fn, [x, gate_up, down, weights], (0, 1, 2, 3), upstream)
        results[name] = [out, *grads]
        torch.cuda.empty_cache()
    errors = {name: RowErrors() for name in results}
    gate_up64 = gate_up.double().requires_grad_()
    down64 = down.double().requires_grad_()
    chunk = 4096 if GPU else 8
    for start in range(0, tokens, chunk):
        part = slice(start, start + chunk)
        x64 = x[part].double().requires_grad_()
        w64 = weights[part].double().requires_grad_()
        out64 = functional_call(module, {"gate_up_proj": gate_up64, "down_proj": down64}, (x64, index[part], w64))
        out64.backward(upstream[0][part].double())
        for name, (out, dx, _, _, dw) in results.items():
            errors[name].add("out", out[part], out64.detach())
            errors[name].add("dx", dx[part], x64.grad)
            errors[name].add("d_top_k_weights", dw[part], w64.grad)
    for name, (_, _, d_gate_up, d_down, _) in results.items():
        errors[name].add("d_gate_up_proj", d_gate_up, gate_up64.grad)
        errors[name].add("d_down_proj", d_down, down64.grad)
    comparison = Comparison("fused_moe T65536 H4160 E128 I768 K8 (>2**31)", dtype)
    for tensor in ("out", "dx", "d_gate_up_proj", "d_down_proj", "d_top_k_weights"):
        comparison.add_errors(tensor, errors["ours"].worst[tensor], errors["theirs"].worst[tensor])
    comparison.check()
