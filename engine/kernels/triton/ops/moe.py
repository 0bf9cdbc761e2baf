"""Triton fused MoE experts for transformers>=5 expert modules (3-D ``gate_up_proj`` / ``down_proj``).

Forward:  gather x rows by expert -> grouped GEMM with W_gate_up and a SwiGLU epilogue (keeps the pre-activation
          for backward) -> grouped GEMM with W_down scaled by the routing weight -> per-token gather-sum.
Backward: grouped GEMM of the gathered output gradient with W_down whose epilogue produces the SwiGLU input
          gradient and, through fp32 atomics, the routing-weight gradient -> grouped dgrad with W_gate_up ->
          gather-sum; expert weight gradients by per-expert GEMMs over each expert's rows.
No host sync (routing is device-side), no weight copies or transposes (weights are read through strides),
int64 offsets everywhere. Every tensor argument may have any strides. Tiles are chosen per element size within
the device's shared memory (``moe_tiles.py``). The operators are ``engine::fused_moe`` and
``engine::fused_moe_backward``; routing and the routing-weight gather are plain torch ops around them.
bf16 calls on Hopper take ``moe_grouped.py`` instead: the same steps with CUTLASS GEMMs and the epilogues
as row kernels (``moe_rows.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.moe_tiles import MoETiles, choose_tiles, preferred_block_m
from engine.kernels.triton.ops import moe_grouped
from engine.kernels.triton.ops.library import KernelOp, run_kernel, unused_pointer
from engine.kernels.triton.ops.moe_routing import Routing, route
from engine.kernels.triton.ops.moe_rows import gather_sum
from engine.kernels.triton.ops.swiglu import silu_mul, silu_mul_backward
from engine.kernels.triton.runtime import cdiv, interpreting, next_power_of_2, shared_memory_limit

# Epilogue selectors: host-side ints, and the same values as constexpr globals for use inside kernels.
PLAIN, SCALE_ROWS, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2, 3
_SCALE_ROWS = tl.constexpr(SCALE_ROWS)
_SWIGLU_FWD = tl.constexpr(SWIGLU_FWD)
_SWIGLU_BWD = tl.constexpr(SWIGLU_BWD)


@triton.jit
def _source_rows(SRC, rows, mask, GATHER: tl.constexpr):
    """int64 row indices: ``SRC[rows]`` when gathering, else ``rows`` themselves."""
    if GATHER:
        return tl.load(SRC + rows, mask=mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _mma(a, b, acc, carry, PRECISION: tl.constexpr, BLOCKWISE: tl.constexpr):
    """``(acc + a @ b, carry)``. BLOCKWISE (fp32) computes each K block's product on its own and adds it to
    ``acc`` with Kahan compensation (``carry`` holds the rounding the sum lost): a plain running sum over K
    carries ~sqrt(K) roundings into every output (about 4x cuBLAS's fp32 error at K=4160, issue 12). The block
    product is subtracted from first, so Triton cannot fold it back into ``dot(a, b, acc)`` (its combine pass
    does that to ``acc + dot(a, b)``, which is why a plain blockwise sum measured no better)."""
    if BLOCKWISE:
        y = tl.dot(a, b, input_precision=PRECISION) - carry
        total = acc + y
        carry = (total - acc) - y
        return total, carry
    return tl.dot(a, b, acc, input_precision=PRECISION), carry


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
    SUM_DW: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCKWISE: tl.constexpr,
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
    carry = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # Kahan terms; unused (and removed) unless BLOCKWISE
    carry_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, kd, BLOCK_K):
        k_mask = (k0 + ks) < kd
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc, carry = _mma(a, b, acc, carry, PRECISION, BLOCKWISE)
        if EPILOGUE == _SWIGLU_FWD:
            b_up = tl.load(b_ptrs + half_n * stride_bn, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_FP32:
                b_up = b_up.to(tl.float32)
            acc_up, carry_up = _mma(a, b_up, acc_up, carry_up, PRECISION, BLOCKWISE)
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
        if SUM_DW:  # the routing-weight gradient, <d_act, act> per row
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
    BLOCKWISE: tl.constexpr,
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
    carry = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
        acc, carry = _mma(x, y, acc, carry, PRECISION, BLOCKWISE)
    d_ptrs = DW + expert.to(tl.int64) * stride_de + ms[:, None].to(tl.int64) * stride_dm + ns[None, :] * stride_dn
    tl.store(d_ptrs, acc.to(DW.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _dot_flags(t: torch.Tensor) -> dict[str, object]:
    """fp32 inputs get IEEE dots (not tf32), Kahan-summed over K blocks (``_mma``). The interpreter's
    half-precision dot is unreliable, so it upcasts."""
    fp32 = t.dtype == torch.float32
    return {"DOT_FP32": interpreting(), "PRECISION": "ieee" if fp32 else "tf32", "BLOCKWISE": fp32}


def _fit(block: int, dim: int) -> int:
    """A block no larger than the dimension needs (min 16, the tl.dot minimum)."""
    return max(16, min(block, next_power_of_2(dim)))


def _row_gemm_launch(
    name: str,
    tiles: MoETiles,
    routing: Routing,
    a: torch.Tensor,
    b_view: torch.Tensor,
    c: torch.Tensor,
    *,
    n_out: int,
    kd: int,
    epilogue: int,
    gather_a: bool = False,
    gate_up: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
    half_n: int = 0,
) -> None:
    """b_view is a [E, kd, n] strided view of an expert weight (no copy)."""
    cfg = tiles[name]
    block_n, block_k = _fit(cfg.block_n, n_out), _fit(cfg.block_k, kd)
    run_kernel(
        _row_gemm,
        (routing.max_tiles * cdiv(n_out, block_n),),
        a,
        b_view,
        c,
        gate_up if gate_up is not None else unused_pointer(c),
        routing.token_of_row,
        row_scale if row_scale is not None else unused_pointer(c),
        dw if dw is not None else unused_pointer(c),
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
        SUM_DW=dw is not None,
        **_dot_flags(a),
        BLOCK_M=routing.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _wgrad_launch(
    tiles: MoETiles,
    routing: Routing,
    x: torch.Tensor,
    y: torch.Tensor,
    dw: torch.Tensor,
    *,
    gather_x: bool = False,
    scale_x: torch.Tensor | None = None,
    gather_y: bool = False,
) -> None:
    """dw[e] ([E, m, n], any strides) = x[rows_e]^T @ y[rows_e]."""
    cfg = tiles["wgrad"]
    experts, m_dim, n_dim = dw.shape
    block_m, block_n = _fit(cfg.block_m, m_dim), _fit(cfg.block_n, n_dim)
    run_kernel(
        _expert_wgrad,
        (experts * cdiv(m_dim, block_m) * cdiv(n_dim, block_n),),
        x,
        y,
        dw,
        routing.token_of_row,
        scale_x if scale_x is not None else unused_pointer(dw),
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


def _tiles(x: torch.Tensor, block_m: int) -> MoETiles:
    """Tile configurations for routing tile height ``block_m`` within this device's shared memory."""
    tiles = choose_tiles(block_m, x.dtype.itemsize, shared_memory_limit(x.device))
    if tiles is None:
        raise RuntimeError(f"fused_moe: no tile configuration fits this device's shared memory for {x.dtype}")
    return tiles


def _forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    row_weight: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    token_of_row: torch.Tensor,
    expert_start: torch.Tensor,
    expert_end: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row_start: torch.Tensor,
    block_m: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, H], gate_up pre-activation [T*K, 2I], act [T*K, I]) in routing row order; the CUTLASS path
    returns an empty act (its backward recomputes the activation from gate_up)."""
    routing = Routing(order, inverse, token_of_row, expert_start, expert_end, tile_expert, tile_row_start, block_m)
    tokens, hidden = x.shape
    inter = gate_up_proj.shape[1] // 2
    rows = token_of_row.shape[0]
    if moe_grouped.fits(x, gate_up_proj, down_proj, rows):
        return moe_grouped.forward(x, gate_up_proj, down_proj, row_weight, routing, top_k)
    tiles = _tiles(x, block_m)
    gate_up = torch.empty(rows, 2 * inter, dtype=x.dtype, device=x.device)
    act = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    if rows == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format), gate_up, act
    _row_gemm_launch(
        "up_swiglu",
        tiles,
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
    _row_gemm_launch(
        "down_scale",
        tiles,
        routing,
        act,
        down_proj.transpose(1, 2),
        y,
        n_out=hidden,
        kd=inter,
        epilogue=SCALE_ROWS,
        row_scale=row_weight,
    )
    return gather_sum(y, inverse, tokens, top_k, x.dtype), gate_up, act


def _backward(
    d_out: torch.Tensor,
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up: torch.Tensor,
    act: torch.Tensor,
    row_weight: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    token_of_row: torch.Tensor,
    expert_start: torch.Tensor,
    expert_end: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row_start: torch.Tensor,
    block_m: int,
    top_k: int,
    want_dx: bool,
    want_d_gate_up_proj: bool,
    want_d_down_proj: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_gate_up_proj, d_down_proj, d_row_weight); a gradient not wanted is an empty placeholder."""
    routing = Routing(order, inverse, token_of_row, expert_start, expert_end, tile_expert, tile_row_start, block_m)
    tokens, hidden = x.shape
    rows, inter = token_of_row.shape[0], down_proj.shape[2]
    if moe_grouped.fits(x, gate_up_proj, down_proj, rows):
        wants = (want_dx, want_d_gate_up_proj, want_d_down_proj)
        return moe_grouped.backward(d_out, x, gate_up_proj, down_proj, gate_up, row_weight, routing, top_k, *wants)
    tiles = _tiles(x, block_m)
    fp32 = x.dtype == torch.float32
    d_row_weight = torch.zeros(rows, dtype=torch.float32, device=x.device)
    d_x = torch.empty((tokens, hidden) if want_dx else 0, dtype=x.dtype, device=x.device)
    d_gate_up_proj = torch.empty(gate_up_proj.shape if want_d_gate_up_proj else 0, dtype=x.dtype, device=x.device)
    d_down = torch.empty(down_proj.shape if want_d_down_proj else 0, dtype=x.dtype, device=x.device)
    if rows == 0:
        return d_x.zero_(), d_gate_up_proj.zero_(), d_down.zero_(), d_row_weight
    d_gate_up = torch.empty_like(gate_up)
    _row_gemm_launch(
        "down_dgrad_swiglu",
        tiles,
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
        dw=None if fp32 else d_row_weight,
        half_n=inter,
    )
    if fp32:  # summed over hidden instead, as transformers sums it
        d_row_weight = _routing_weight_grad_fp32(tiles, routing, d_out, act, down_proj)
    if want_d_down_proj:
        _wgrad_launch(tiles, routing, d_out, act, d_down, gather_x=True, scale_x=row_weight)
    if want_dx:
        d_x_rows = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
        _row_gemm_launch(
            "up_dgrad", tiles, routing, d_gate_up, gate_up_proj, d_x_rows, n_out=hidden, kd=2 * inter, epilogue=PLAIN
        )
        d_x = gather_sum(d_x_rows, inverse, tokens, top_k, x.dtype)
    if want_d_gate_up_proj:
        _wgrad_launch(tiles, routing, d_gate_up, x, d_gate_up_proj, gather_y=True)
    return d_x, d_gate_up_proj, d_down, d_row_weight


def _routing_weight_grad_fp32(
    tiles: MoETiles, routing: Routing, d_out: torch.Tensor, act: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """d_weight[row] = <d_out[token], act[row] @ down[expert]^T>, the order transformers sums in.

    The fused epilogue (``SUM_DW``, on for bf16/fp16) sums <d_act, act> over the intermediate dimension instead: the
    same value, but in fp32 its rounding measured about 3x transformers' own (issue 12). fp32 training is not a
    speed path, so it pays one more expert GEMM for the closer result and skips the fused sum.
    """
    rows, hidden = act.shape[0], d_out.shape[1]
    y = torch.empty(rows, hidden, dtype=torch.float32, device=act.device)
    _row_gemm_launch(
        "down_scale", tiles, routing, act, down_proj.transpose(1, 2), y, n_out=hidden, kd=act.shape[1], epilogue=PLAIN
    )
    return (y * d_out.index_select(0, routing.token_of_row)).sum(dim=1)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, gate_up_proj, down_proj, row_weight, *routing, block_m, top_k = inputs
    _, gate_up, act = output
    ctx.save_for_backward(x, gate_up_proj, down_proj, gate_up, act, row_weight, *routing)
    ctx.block_m, ctx.top_k = block_m, top_k


def _backward_formula(ctx, d_out, _d_gate_up, _d_act):  # noqa: ANN001, ANN202
    wants = ctx.needs_input_grad[:3]
    d_x, d_gate_up_proj, d_down, d_row_weight = FUSED_MOE_BACKWARD(
        d_out, *ctx.saved_tensors, ctx.block_m, ctx.top_k, *wants
    )
    grads = [g if want else None for g, want in zip((d_x, d_gate_up_proj, d_down), wants, strict=True)]
    return (*grads, d_row_weight, *([None] * 7), None, None)


FUSED_MOE_BACKWARD = KernelOp("fused_moe_backward", _backward)
FUSED_MOE = KernelOp("fused_moe", _forward, setup_context=_setup_context, backward=_backward_formula)


def check_moe_args(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> None:
    """One-line ``ValueError`` unless x [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], index/weights [T, K]."""
    if x.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            f"fused_moe: x {tuple(x.shape)} must be [T, H] and gate_up_proj {tuple(gate_up_proj.shape)} / "
            f"down_proj {tuple(down_proj.shape)} [E, 2I, H] / [E, H, I]"
        )
    tokens, hidden = x.shape
    experts, two_i, gu_hidden = gate_up_proj.shape
    if two_i % 2 or gu_hidden != hidden or tuple(down_proj.shape) != (experts, hidden, two_i // 2):
        raise ValueError(
            f"fused_moe: gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)} "
            f"do not match [E, 2I, H] / [E, H, I] with H = {hidden}"
        )
    if top_k_index.dim() != 2 or top_k_index.shape[0] != tokens or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"fused_moe: top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
            f"must both be [T, K] with T = {tokens}"
        )
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
        raise ValueError(f"fused_moe: top_k_index must hold integer expert ids, got {top_k_index.dtype}")
    if not x.dtype == gate_up_proj.dtype == down_proj.dtype or not x.dtype.is_floating_point:
        raise ValueError(
            f"fused_moe: x ({x.dtype}), gate_up_proj ({gate_up_proj.dtype}) and down_proj ({down_proj.dtype}) "
            "must share one floating dtype"
        )
    if not top_k_weights.dtype.is_floating_point:
        raise ValueError(f"fused_moe: top_k_weights must be floating point, got {top_k_weights.dtype}")


def fused_moe(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' experts forward: ``sum_k w[t,k] * down[e](silu(gate[e](x)) * up[e](x))``, with autograd.

    Expert ids must lie in ``[0, E)`` (not checked: that would sync with the device). Raises
    ``RuntimeError`` where no tiling fits the device (``moe_tiles.unfit_reason`` says so in advance).
    """
    check_moe_args(x, gate_up_proj, down_proj, top_k_index, top_k_weights)
    tokens, top_k = top_k_index.shape
    experts = gate_up_proj.shape[0]
    block_m = preferred_block_m(tokens * top_k, experts)
    routing = route(top_k_index, experts, block_m)
    row_weight = top_k_weights.reshape(-1)[routing.order].float()
    out, _, _ = FUSED_MOE(x, gate_up_proj, down_proj, row_weight, *routing.tensors(), block_m, top_k)
    return out
