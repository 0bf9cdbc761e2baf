"""The ``engine::`` operators under torch.compile: no graph breaks (``fullgraph=True``), forward and backward equal
to eager, registrations sound (``torch.library.opcheck``). On CPU the kernels run through the interpreter with the
``aot_eager`` backend; on a GPU the same tests also run with Inductor and CUDA graphs (``pytest -m gpu``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import engine
from engine.kernels.kinds import mrope as mrope_kind
from engine.kernels.kinds.base import NoOptions
from engine.kernels.kinds.mrope import MRopeOptions
from engine.kernels.kinds.rms_norm import RMSNormOptions
from engine.kernels.kinds.swiglu import SwiGLUOptions
from engine.kernels.triton.ops import embedding as embedding_ops
from engine.kernels.triton.ops import library, moe_grouped
from engine.kernels.triton.ops import moe as moe_ops
from engine.kernels.triton.ops import mrope as mrope_ops
from engine.kernels.triton.ops import rms_norm as rms_norm_ops
from engine.kernels.triton.ops import rope as rope_ops
from engine.kernels.triton.ops import swiglu as swiglu_ops
from engine.kernels.triton.ops.moe_routing import route
from engine.testing import tiny_models

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="Inductor and CUDA graphs need a GPU")]
BACKENDS = ["aot_eager", pytest.param("inductor", marks=needs_gpu)]


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def op_cases() -> dict[str, tuple]:
    """name -> (function, inputs, which inputs get gradients)."""
    experts, top_k, tokens = 4, 2, 9
    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32, device=DEVICE) / 16))
    return {
        "rms_norm": (lambda x, w: rms_norm_ops.rms_norm(x, w, 1e-6), [_randn(3, 5, 40), _randn(40, seed=1)], (0, 1)),
        "rms_norm_gemma": (
            lambda x, w: rms_norm_ops.rms_norm(x, w, 1e-6, 1.0, True),
            [_randn(7, 24, dtype=torch.bfloat16), _randn(24, seed=1, scale=0.1)],
            (0, 1),
        ),
        "swiglu": (swiglu_ops.swiglu, [_randn(4, 30), _randn(4, 30, seed=1)], (0, 1)),
        "swiglu_linear": (
            swiglu_ops.swiglu_linear,
            [_randn(2, 4, 30), _randn(2, 4, 30, seed=1), _randn(12, 30, seed=2, scale=0.2), _randn(12, seed=3)],
            (0, 1, 2, 3),
        ),
        "swiglu_mlp": (
            swiglu_ops.swiglu_mlp,
            [
                _randn(2, 3, 20),
                _randn(30, 20, seed=1, scale=0.2),
                _randn(30, 20, seed=2, scale=0.2),
                _randn(12, 30, seed=3, scale=0.2),
                _randn(30, seed=4),
                _randn(30, seed=5),
                _randn(12, seed=6),
            ],
            (0, 1, 2, 3, 4, 5, 6),
        ),  # fmt: skip
        "rope": (
            rope_ops.rope,
            [_randn(2, 4, 6, 16), _randn(2, 2, 6, 16, seed=1), _randn(1, 6, 16, seed=2), _randn(1, 6, 16, seed=3)],
            (0, 1),
        ),
        "vision_rope": (
            rope_ops.vision_rope,
            [_randn(6, 3, 16, dtype=torch.float16), _randn(6, 3, 16, seed=1), _randn(6, 16, seed=2), _randn(6, 16)],
            (0, 1),
        ),
        "mrope_cos_sin": (
            lambda pos, inv, table: mrope_ops.mrope_cos_sin(pos, inv, table, 0.5, torch.bfloat16),
            [torch.randint(0, 99, (3, 2, 7), device=DEVICE), inv_freq, mrope_kind.axis_table(8, [2, 3, 3]).to(DEVICE)],
            (),
        ),
        "fused_moe": (
            moe_ops.fused_moe,
            [
                _randn(tokens, 32),
                _randn(experts, 32, 32, seed=1, scale=0.2),
                _randn(experts, 32, 16, seed=2, scale=0.2),
                index,
                torch.rand(tokens, top_k, generator=gen).to(DEVICE),
            ],
            (0, 1, 2, 4),
        ),
        "embedding": (  # token 5 is used 12 times: the heavy-row launch as well; row 3 is padding
            lambda w, ids: embedding_ops.embedding(ids, w, 3),
            [
                _randn(40, 24),
                torch.tensor([[5] * 12 + [3, 0, 39], [7, 5, 3, 8, 8, 1, 2, 39, 0, 0, 1, 5, 5, 6, 9]]).to(DEVICE),
            ],
            (0,),
        ),
        "fused_moe_bf16": (  # on Hopper its expert GEMMs are torch._grouped_mm (moe_grouped), elsewhere Triton's
            moe_ops.fused_moe,
            [
                _randn(tokens, 32, dtype=torch.bfloat16),
                _randn(experts, 32, 32, seed=1, scale=0.2, dtype=torch.bfloat16),
                _randn(experts, 32, 16, seed=2, scale=0.2, dtype=torch.bfloat16),
                index,
                torch.rand(tokens, top_k, generator=gen).to(DEVICE, torch.bfloat16),
            ],
            (0, 1, 2, 4),
        ),
    }


CASES = list(op_cases())


def outputs_and_grads(fn, inputs, grad_of):
    leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    if grad_of:
        weights = [torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape) for o in outs]
        sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
    return [o.detach() for o in outs] + [leaves[i].grad for i in grad_of]


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_compiled_op_matches_eager_without_graph_breaks(case, backend):
    fn, inputs, grad_of = op_cases()[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    assert_same(outputs_and_grads(compiled, inputs, grad_of), outputs_and_grads(fn, inputs, grad_of))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_ops_with_dynamic_shapes(backend):
    torch._dynamo.reset()
    for name in ("rms_norm", "fused_moe"):
        fn, inputs, grad_of = op_cases()[name]
        compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
        assert_same(outputs_and_grads(compiled, inputs, grad_of), outputs_and_grads(fn, inputs, grad_of))
    fn, (x, w), grad_of = op_cases()["rms_norm"]
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    for rows in (2, 11):
        longer = [_randn(rows, 5, 40, seed=rows), w]
        assert_same(outputs_and_grads(compiled, longer, grad_of), outputs_and_grads(fn, longer, grad_of))


def _grad_if_float(value):
    return value.requires_grad_() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


OPERATORS = [
    "rms_norm",
    "rms_norm_backward",
    "swiglu",
    "swiglu_backward",
    "rope",
    "mrope_cos_sin",
    "fused_moe",
    "fused_moe_backward",
    "embedding",
    "embedding_backward",
]


def _op_arguments() -> dict[str, tuple]:
    """Each operator (forward and backward) with arguments to exercise it."""
    x, w = _randn(3, 40, scale=1.0), _randn(40, seed=1)
    y, rstd = rms_norm_ops.RMS_NORM(x, w, 1e-6, 0.0, False)
    q, k, cos = _randn(2, 4, 6, 16), _randn(2, 2, 6, 16, seed=1), _randn(1, 6, 16, seed=2)
    f32 = torch.float32
    experts, top_k, tokens = 4, 2, 9
    xm = _randn(tokens, 32)
    gate_up, down = _randn(experts, 32, 32, seed=1, scale=0.2), _randn(experts, 32, 16, seed=2, scale=0.2)
    index = torch.arange(tokens * top_k, device=DEVICE).view(tokens, top_k) % experts
    routing = route(index, experts, 64)
    row_weight = torch.rand(tokens * top_k, device=DEVICE)
    moe_args = (xm, gate_up, down, row_weight, *routing.tensors(), 64, top_k)
    _, gu_rows, act = moe_ops.FUSED_MOE(*moe_args)
    backward_args = (xm, xm, gate_up, down, gu_rows, act, row_weight, *routing.tensors(), 64, top_k, True, True, True)
    backward_args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in backward_args)
    pos = torch.randint(0, 99, (3, 2, 7), device=DEVICE)
    inv_freq, table = _randn(8).abs(), mrope_kind.axis_table(8, [2, 3, 3]).to(DEVICE)
    vocab_table = _randn(40, 24)
    ids = torch.tensor([[5] * 12 + [3, 0, 39], [7, 5, 3, 8, 8, 1, 2, 39, 0, 0, 1, 5, 5, 6, 9]], device=DEVICE)
    return {
        "embedding": (embedding_ops.EMBEDDING, (vocab_table.requires_grad_(), ids, 3)),
        "embedding_backward": (embedding_ops.EMBEDDING_BACKWARD, (_randn(2, 15, 24, seed=1), ids, 40, 3)),
        "rms_norm": (rms_norm_ops.RMS_NORM, (x.requires_grad_(), w.requires_grad_(), 1e-6, 0.5, False)),
        "rms_norm_backward": (rms_norm_ops.RMS_NORM_BACKWARD, (y, x.detach(), w.detach(), rstd, 0.5, False, True)),
        "swiglu": (swiglu_ops.SWIGLU, (x.detach().clone().requires_grad_(), y.clone().requires_grad_())),
        "swiglu_backward": (swiglu_ops.SWIGLU_BACKWARD, (x.detach(), y.detach(), rstd[:, None].expand(3, 40))),
        "rope": (rope_ops.ROPE, (q.requires_grad_(), k.requires_grad_(), cos, cos.flip(1), f32, f32, False)),
        "mrope_cos_sin": (mrope_ops.MROPE_COS_SIN, (pos, inv_freq, table, 1.0, torch.float16)),
        "fused_moe": (moe_ops.FUSED_MOE, tuple(_grad_if_float(a) for a in moe_args)),
        "fused_moe_backward": (moe_ops.FUSED_MOE_BACKWARD, backward_args),
    }


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_registration_passes_opcheck(name):
    kernel_op, args = _op_arguments()[name]
    assert kernel_op.overload is getattr(torch.ops.engine, name).default
    results = torch.library.opcheck(kernel_op.op, args)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("case", CASES)
def test_eager_op_and_function_paths_agree(case):
    fn, inputs, grad_of = op_cases()[case]
    with library.eager_path("op"):
        via_op = outputs_and_grads(fn, inputs, grad_of)
    with library.eager_path("function"):
        via_function = outputs_and_grads(fn, inputs, grad_of)
    for a, b in zip(via_op, via_function, strict=True):
        assert torch.equal(a, b)


@functools.cache
def _kernel_targets():
    """(kernel class, target, options, call arguments, which arguments get gradients), tiny transformers models."""
    qwen3 = tiny_models.build("qwen3").to(DEVICE)
    moe = tiny_models.build("qwen3_moe").to(DEVICE)
    vl = tiny_models.build("qwen2_vl").to(DEVICE)
    layer = qwen3.model.layers[0]
    hidden = qwen3.config.hidden_size
    head_dim = qwen3.config.head_dim
    x = _randn(2, 5, hidden)
    q, k = _randn(2, 4, 5, head_dim, seed=1), _randn(2, 2, 5, head_dim, seed=2)
    cos, sin = _randn(2, 5, head_dim, seed=3), _randn(2, 5, head_dim, seed=4)
    experts = moe.model.layers[0].mlp.experts
    tokens, top_k = 6, moe.config.num_experts_per_tok
    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    rotary = vl.model.language_model.rotary_emb
    import transformers.models.qwen2_vl.modeling_qwen2_vl as qwen2_vl
    import transformers.models.qwen3.modeling_qwen3 as qwen3_module

    vision_q = _randn(7, 2, 16, seed=5)
    return {
        "rms_norm": (engine.TritonRMSNormKernel, layer.input_layernorm, RMSNormOptions(), (x,), (0,)),
        "swiglu": (engine.TritonSwiGLUKernel, layer.mlp, SwiGLUOptions(), (x,), (0,)),
        "swiglu_recompute": (engine.TritonSwiGLUKernel, layer.mlp, SwiGLUOptions(recompute="projections"), (x,), (0,)),
        "rope": (engine.TritonRoPEKernel, qwen3_module.apply_rotary_pos_emb, NoOptions(), (q, k, cos, sin), (0, 1)),
        "fused_moe": (
            engine.TritonFusedMoEKernel,
            experts,
            NoOptions(),
            (_randn(tokens, moe.config.hidden_size), index.to(DEVICE), torch.rand(tokens, top_k).to(DEVICE)),
            (0, 2),
        ),
        "mrope": (
            engine.TritonMRoPEKernel,
            rotary,
            MRopeOptions(layout="sectioned"),
            (x, torch.randint(0, 50, (3, 2, 5), device=DEVICE)),
            (),
        ),
        "embedding": (
            engine.TritonEmbeddingKernel,
            qwen3.model.embed_tokens,
            NoOptions(),
            (torch.randint(0, qwen3.config.vocab_size, (2, 5), generator=gen).to(DEVICE),),
            (),
        ),
        "vision_rope": (
            engine.TritonVisionRoPEKernel,
            qwen2_vl.apply_rotary_pos_emb_vision,
            NoOptions(),
            (vision_q, vision_q.flip(0), _randn(7, 16, seed=6), _randn(7, 16, seed=7)),
            (0, 1),
        ),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rms_norm", "swiglu", "rope", "fused_moe", "mrope", "vision_rope", "embedding"])
def test_kernel_classes_trace_without_graph_breaks(name, backend):
    kernel, target, options, args, grad_of = _kernel_targets()[name]
    assert kernel.supports(options, *args)

    def call(*values):
        return kernel.run(target, options, *values)

    torch._dynamo.reset()
    compiled = torch.compile(call, backend=backend, fullgraph=True)
    assert_same(outputs_and_grads(compiled, args, grad_of), outputs_and_grads(call, args, grad_of))


_TRACE_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    logging.disable(logging.WARNING)  # kernel mutation analysis warns without a GPU driver
    import torch
    from functorch.compile import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    sys.path.insert(0, os.getcwd())
    from engine.kernels.triton.ops import library
    from tests.test_triton_compile import op_cases

    assert library.USE_TRITON_OP

    class Traced(Exception):
        pass

    def kernels_launched(fn, inputs, grad_of, dynamic):
        names = []

        def record(graph, *args, **kwargs):
            for node in graph.graph.nodes:
                if "triton_kernel_wrapper" in str(node.target):
                    names.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
            raise Traced

        leaves = [t.detach().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
        try:
            aot_function(fn, fw_compiler=record, partition_fn=record, dynamic=dynamic)(*leaves)
        except Traced:
            pass
        return names

    for name, (fn, inputs, grad_of) in op_cases().items():
        for dynamic in (False, True) if name in ("rms_norm", "fused_moe") else (False,):
            print(name, dynamic, " ".join(kernels_launched(fn, inputs, grad_of, dynamic)))
    """
)


TRITON_GEMM_MOE = {"_row_gemm", "_gather_sum_kernel", "_expert_wgrad"}
CUTLASS_MOE_ROWS = {"_swiglu_rows_kernel", "_swiglu_rows_backward_kernel", "_gather_sum_kernel"}


def expected_kernels() -> dict[str, set[str]]:
    """The Triton kernels each op case launches, forward and backward, on this machine."""
    x, gate_up, down, index, _ = op_cases()["fused_moe_bf16"][1]
    grouped = moe_grouped.fits(x, gate_up, down, rows=index.numel())
    return {
        "rms_norm": {"_rms_norm_fwd", "_rms_norm_bwd"},
        "rms_norm_gemma": {"_rms_norm_fwd", "_rms_norm_bwd"},
        "swiglu": {"_swiglu_fwd", "_swiglu_bwd"},
        "swiglu_linear": {"_swiglu_fwd", "_swiglu_bwd"},  # the GEMMs are aten ops beside them
        "rope": {"_rope_kernel"},
        "vision_rope": {"_rope_kernel"},
        "mrope_cos_sin": {"_mrope_cos_sin"},
        "fused_moe": TRITON_GEMM_MOE,
        # on Hopper the bf16 experts' GEMMs are aten grouped GEMMs beside the row kernels; elsewhere Triton's
        "fused_moe_bf16": CUTLASS_MOE_ROWS if grouped else TRITON_GEMM_MOE,
        "embedding": {"_embedding_grad_rows", "_embedding_grad_heavy"},
    }


def test_triton_op_bodies_trace_into_kernel_launches():
    """The GPU form of the operators (``triton_op``), traced (CPU tensors in CI, CUDA tensors on a GPU): every
    launch must become a graph node that Inductor compiles (fwd and bwd; dynamic shapes for two). Runs without
    the interpreter."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {}
    for line in result.stdout.splitlines():
        name, dynamic, *kernels = line.split()
        seen[(name, dynamic)] = kernels
    for name, expected in expected_kernels().items():
        for dynamic in ("False", "True") if name in ("rms_norm", "fused_moe") else ("False",):
            assert set(seen[(name, dynamic)]) == expected, (name, dynamic, seen.get((name, dynamic)))
    assert seen[("rms_norm", "False")].count("_rms_norm_bwd") == 1  # the backward is in the same joint graph


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("case", CASES)
def test_reduce_overhead_training_steps_replay_correctly(case):
    """mode="reduce-overhead" (CUDA graphs): nothing makes Inductor skip the graphs (no host sync, no CPU
    tensor), and every replay with new inputs gives eager's outputs and gradients."""
    from torch._dynamo.utils import counters

    fn, inputs, grad_of = op_cases()[case]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        fresh = [
            t + 0.01 * seed * torch.randn_like(t) if t.is_floating_point() and i in grad_of else t
            for i, t in enumerate(inputs)
        ]
        got = [t.clone() for t in outputs_and_grads(compiled, fresh, grad_of)]
        assert_same(got, outputs_and_grads(fn, fresh, grad_of))
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="only a GPU's triton_op bodies are traced into their launches")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_calls_never_touch_the_eager_workspace(backend):
    """RMSNorm's cached workspace is for eager calls: a compiled graph must allocate its own (CUDA graphs)."""
    torch._dynamo.reset()
    compiled = {name: torch.compile(op_cases()[name][0], backend=backend, fullgraph=True) for name in CASES}
    rms_norm_ops._tail_workspaces.clear()
    for name, (_, inputs, grad_of) in op_cases().items():
        outputs_and_grads(compiled[name], inputs, grad_of)
    torch.cuda.synchronize()
    assert not rms_norm_ops._tail_workspaces
