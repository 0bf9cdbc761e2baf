"""Triton fused MoE experts for transformers>=5 expert modules (3-D ``gate_up_proj`` / ``down_proj``).

Forward:  gather x rows by expert -> grouped GEMM with W_gate_up and a SwiGLU epilogue (keeps the pre-activation
          for backward) -> grouped GEMM with W_down scaled by the routing weight -> per-token gather-sum.
Backward: grouped GEMM of the gathered output gradient with W_down whose epilogue produces the SwiGLU input
          gradient and, through fp32 atomics, the routing-weight gradient -> grouped dgrad with W_gate_up ->
          gather-sum; expert weight gradients by per-expert GEMMs over each expert's rows.
No host sync (routing is device-side), no weight copies or transposes (weights are read through strides),
int64 offsets everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.triton.launch import launch
from engine.kernels.triton.ops.moe_routing import Routing, choose_block_m, route
from engine.kernels.triton.ops.swiglu import silu_mul, silu_mul_backward
from engine.kernels.triton.runtime import interpreting, next_power_of_2

# Epilogue selectors: host-side ints, and the same values as constexpr globals for use inside kernels.
PLAIN, SCALE_ROWS, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2, 3
_SCALE_ROWS = tl.constexpr(SCALE_ROWS)
_SWIGLU_FWD = tl.constexpr(SWIGLU_FWD)
_SWIGLU_BWD = tl.constexpr(SWIGLU_BWD)


@dataclass
class TileConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Tuned on an H100 for the Qwen3-30B-A3B expert shape (see benchmarks/bench_moe.py); edit to retune.
CONFIGS: dict[str, TileConfig] = {
    "up_swiglu": TileConfig(128, 64, 8, 4),
    "down_scale": TileConfig(128, 64, 4, 3),
    "down_dgrad_swiglu": TileConfig(64, 64, 8, 4),
    "up_dgrad": TileConfig(128, 64, 4, 4),
    "wgrad": TileConfig(128, 64, 8, 4),
}
WGRAD_BLOCK_M = 128


@triton.jit
def _source_rows(SRC, rows, mask, GATHER: tl.constexpr):
    """int64 row indices: ``SRC[rows]`` when gathering, else ``rows`` themselves."""
    if GATHER:
        return tl.load(SRC + rows, mask=mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _row_gemm(
    A,
    B,
    C,
    GATE_UP,
    ROW_SRC,
    ROW_SCALE,
    DW,
    TILE_EXPERT,
    TILE_ROW_START,
    EXPERT_END,
    n_out,
    kd,
    half_n,
    num_experts,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_gm,
    GATHER_A: tl.constexpr,
    EPILOGUE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[rows] = epilogue(A[src(rows)] @ B[expert]) for one (tile, column block); B is a strided [kd, n] view."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_out, BLOCK_N)
    tile = pid // n_blocks
    col_block = pid % n_blocks
    expert = tl.load(TILE_EXPERT + tile)
    if expert >= num_experts:
        return
    row_start = tl.load(TILE_ROW_START + tile)
    row_end = tl.load(EXPERT_END + expert)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    src = _source_rows(ROW_SRC, rows, row_mask, GATHER_A)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + src[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, kd, BLOCK_K):
        k_mask = (k0 + ks) < kd
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if EPILOGUE == _SWIGLU_FWD:
            b_up = tl.load(b_ptrs + half_n * stride_bn, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_FP32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    rows64 = rows.to(tl.int64)
    out_mask = row_mask[:, None] & col_mask[None, :]
    c_ptrs = C + rows64[:, None] * stride_cm + cols[None, :]
    if EPILOGUE == _SWIGLU_FWD:
        gate = acc.to(C.dtype.element_ty)
        up = acc_up.to(C.dtype.element_ty)
        g_ptrs = GATE_UP + rows64[:, None] * stride_gm + cols[None, :]
        tl.store(g_ptrs, gate, mask=out_mask)
        tl.store(g_ptrs + half_n, up, mask=out_mask)
        act = silu_mul(gate.to(tl.float32), up.to(tl.float32))
        tl.store(c_ptrs, act.to(C.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == _SCALE_ROWS:
        scale = tl.load(ROW_SCALE + rows, mask=row_mask, other=0.0)
        tl.store(c_ptrs, (acc * scale[:, None]).to(C.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == _SWIGLU_BWD:
        g_ptrs = GATE_UP + rows64[:, None] * stride_gm + cols[None, :]
        g = tl.load(g_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        u = tl.load(g_ptrs + half_n, mask=out_mask, other=0.0).to(tl.float32)
        act = silu_mul(g, u).to(C.dtype.element_ty).to(tl.float32)  # the activation as stored in forward
        tl.atomic_add(DW + rows, tl.sum(acc * act, axis=1), mask=row_mask)
        scale = tl.load(ROW_SCALE + rows, mask=row_mask, other=0.0)
        d_gate, d_up = silu_mul_backward(g, u, acc * scale[:, None])
        tl.store(c_ptrs, d_gate.to(C.dtype.element_ty), mask=out_mask)
        tl.store(c_ptrs + half_n, d_up.to(C.dtype.element_ty), mask=out_mask)
    else:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=out_mask)


@triton.jit
def _expert_wgrad(
    X,
    Y,
    DW,
    ROW_SRC,
    X_SCALE,
    EXPERT_START,
    EXPERT_END,
    m_dim,
    n_dim,
    stride_xr,
    stride_xc,
    stride_yr,
    stride_yc,
    stride_de,
    stride_dm,
    stride_dn,
    GATHER_X: tl.constexpr,
    SCALE_X: tl.constexpr,
    GATHER_Y: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """DW[e] = X[rows_e]^T @ Y[rows_e] (rows optionally gathered, X rows optionally scaled)."""
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(m_dim, BLOCK_M)
    n_blocks = tl.cdiv(n_dim, BLOCK_N)
    expert = pid // (m_blocks * n_blocks)
    rest = pid % (m_blocks * n_blocks)
    ms = (rest // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (rest % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < m_dim
    n_mask = ns < n_dim
    start = tl.load(EXPERT_START + expert)
    end = tl.load(EXPERT_END + expert)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + ks
        r_mask = rows < end
        xr = _source_rows(ROW_SRC, rows, r_mask, GATHER_X)
        yr = _source_rows(ROW_SRC, rows, r_mask, GATHER_Y)
        x = tl.load(
            X + xr[None, :] * stride_xr + ms[:, None] * stride_xc, mask=m_mask[:, None] & r_mask[None, :], other=0.0
        )
        if SCALE_X:
            scale = tl.load(X_SCALE + rows, mask=r_mask, other=0.0)
            x = (x.to(tl.float32) * scale[None, :]).to(Y.dtype.element_ty)
        y = tl.load(
            Y + yr[:, None] * stride_yr + ns[None, :] * stride_yc, mask=r_mask[:, None] & n_mask[None, :], other=0.0
        )
        if DOT_FP32:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    d_ptrs = DW + expert.to(tl.int64) * stride_de + ms[:, None].to(tl.int64) * stride_dm + ns[None, :] * stride_dn
    tl.store(d_ptrs, acc.to(DW.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gather_sum(SRC, DST, INVERSE, top_k, hidden, stride_s, stride_d, BLOCK_H: tl.constexpr):
    """DST[t] = sum_k SRC[inverse[t * top_k + k]] in fp32."""
    token = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hs < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(top_k):
        row = tl.load(INVERSE + token * top_k + k).to(tl.int64)
        acc += tl.load(SRC + row * stride_s + hs, mask=h_mask, other=0.0).to(tl.float32)
    tl.store(DST + token * stride_d + hs, acc.to(DST.dtype.element_ty), mask=h_mask)


def _dot_flags(t: torch.Tensor) -> dict[str, object]:
    """fp32 inputs get IEEE dots (not tf32). The interpreter's half-precision dot is unreliable, so it upcasts."""
    return {"DOT_FP32": interpreting(), "PRECISION": "ieee" if t.dtype == torch.float32 else "tf32"}


def _fit(block: int, dim: int) -> int:
    """A block no larger than the dimension needs (min 16, the tl.dot minimum)."""
    return max(16, min(block, next_power_of_2(dim)))


def _row_gemm_launch(
    name: str,
    routing: Routing,
    a,
    b_view,
    c,
    *,
    n_out: int,
    kd: int,
    epilogue: int,
    gather_a: bool = False,
    gate_up=None,
    row_scale=None,
    dw=None,
    half_n: int = 0,
) -> None:
    """b_view is a [E, kd, n] strided view of an expert weight (no copy)."""
    cfg = CONFIGS[name]
    block_n, block_k = _fit(cfg.block_n, n_out), _fit(cfg.block_k, kd)
    grid = (routing.max_tiles * triton.cdiv(n_out, block_n),)
    dummy = c
    launch(
        _row_gemm,
        grid,
        a,
        b_view,
        c,
        gate_up if gate_up is not None else dummy,
        routing.token_of_row,
        row_scale if row_scale is not None else dummy,
        dw if dw is not None else dummy,
        routing.tile_expert,
        routing.tile_row_start,
        routing.expert_end,
        n_out,
        kd,
        half_n,
        b_view.shape[0],
        a.stride(0),
        a.stride(1),
        b_view.stride(0),
        b_view.stride(1),
        b_view.stride(2),
        c.stride(0),
        gate_up.stride(0) if gate_up is not None else 0,
        GATHER_A=gather_a,
        EPILOGUE=epilogue,
        **_dot_flags(a),
        BLOCK_M=routing.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _wgrad_launch(routing: Routing, x, y, dw, *, gather_x=False, scale_x=None, gather_y=False) -> None:
    """dw[e] ([E, m, n], any strides) = x[rows_e]^T @ y[rows_e]."""
    cfg = CONFIGS["wgrad"]
    experts, m_dim, n_dim = dw.shape
    block_m, block_n = _fit(WGRAD_BLOCK_M, m_dim), _fit(cfg.block_n, n_dim)
    grid = (experts * triton.cdiv(m_dim, block_m) * triton.cdiv(n_dim, block_n),)
    launch(
        _expert_wgrad,
        grid,
        x,
        y,
        dw,
        routing.token_of_row,
        scale_x if scale_x is not None else dw,
        routing.expert_start,
        routing.expert_end,
        m_dim,
        n_dim,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        GATHER_X=gather_x,
        SCALE_X=scale_x is not None,
        GATHER_Y=gather_y,
        **_dot_flags(y),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _gather_sum_launch(src: torch.Tensor, inverse: torch.Tensor, tokens: int, top_k: int, dtype) -> torch.Tensor:
    hidden = src.shape[1]
    out = torch.empty(tokens, hidden, dtype=dtype, device=src.device)
    block_h = min(1024, next_power_of_2(hidden))
    launch(
        _gather_sum,
        (tokens, triton.cdiv(hidden, block_h)),
        src,
        out,
        inverse,
        top_k,
        hidden,
        src.stride(0),
        out.stride(0),
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out


class TritonMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, top_k_index, top_k_weights):
        tokens, hidden = x.shape
        experts, two_i, _ = gate_up_proj.shape
        inter = two_i // 2
        top_k = top_k_index.shape[1]
        rows = tokens * top_k
        routing = route(top_k_index, experts, choose_block_m(rows, experts))
        row_weight = top_k_weights.reshape(-1)[routing.order].float()
        x = x.contiguous()

        gate_up = torch.empty(rows, two_i, dtype=x.dtype, device=x.device)
        act = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
        _row_gemm_launch(
            "up_swiglu",
            routing,
            x,
            gate_up_proj.transpose(1, 2),
            act,
            n_out=inter,
            kd=hidden,
            epilogue=SWIGLU_FWD,
            gather_a=True,
            gate_up=gate_up,
            half_n=inter,
        )
        y = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
        _row_gemm_launch(
            "down_scale",
            routing,
            act,
            down_proj.transpose(1, 2),
            y,
            n_out=hidden,
            kd=inter,
            epilogue=SCALE_ROWS,
            row_scale=row_weight,
        )
        out = _gather_sum_launch(y, routing.inverse, tokens, top_k, x.dtype)

        ctx.save_for_backward(
            x,
            gate_up_proj,
            down_proj,
            gate_up,
            act,
            row_weight,
            routing.order,
            routing.inverse,
            routing.token_of_row,
            routing.expert_start,
            routing.expert_end,
            routing.tile_expert,
            routing.tile_row_start,
        )
        ctx.block_m, ctx.top_k, ctx.weights_dtype = routing.block_m, top_k, top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, d_out):
        (
            x,
            gate_up_proj,
            down_proj,
            gate_up,
            act,
            row_weight,
            order,
            inverse,
            token_of_row,
            expert_start,
            expert_end,
            tile_expert,
            tile_row_start,
        ) = ctx.saved_tensors
        routing = Routing(
            order, inverse, token_of_row, expert_start, expert_end, tile_expert, tile_row_start, ctx.block_m
        )
        tokens, hidden = x.shape
        rows, inter = act.shape
        d_out = d_out.contiguous()

        d_row_weight = torch.zeros(rows, dtype=torch.float32, device=x.device)
        d_gate_up = torch.empty_like(gate_up)
        _row_gemm_launch(
            "down_dgrad_swiglu",
            routing,
            d_out,
            down_proj,
            d_gate_up,
            n_out=inter,
            kd=hidden,
            epilogue=SWIGLU_BWD,
            gather_a=True,
            gate_up=gate_up,
            row_scale=row_weight,
            dw=d_row_weight,
            half_n=inter,
        )
        d_down = None
        if ctx.needs_input_grad[2]:
            d_down = torch.empty_like(down_proj)
            _wgrad_launch(routing, d_out, act, d_down, gather_x=True, scale_x=row_weight)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x_rows = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
            _row_gemm_launch(
                "up_dgrad", routing, d_gate_up, gate_up_proj, d_x_rows, n_out=hidden, kd=2 * inter, epilogue=PLAIN
            )
            d_x = _gather_sum_launch(d_x_rows, inverse, tokens, ctx.top_k, x.dtype)
        d_gate_up_proj = None
        if ctx.needs_input_grad[1]:
            d_gate_up_proj = torch.empty_like(gate_up_proj)
            _wgrad_launch(routing, d_gate_up, x, d_gate_up_proj, gather_y=True)
        d_weights = d_row_weight[inverse].view(tokens, ctx.top_k).to(ctx.weights_dtype)
        return d_x, d_gate_up_proj, d_down, None, d_weights


def fused_moe(x, gate_up_proj, down_proj, top_k_index, top_k_weights) -> torch.Tensor:
    """transformers' experts forward: ``sum_k w[t,k] * down[e](silu(gate[e](x)) * up[e](x))``, with autograd."""
    return TritonMoEFunction.apply(x, gate_up_proj, down_proj, top_k_index, top_k_weights)
