"""The fused MoE's bf16 path on Hopper: expert GEMMs through ``torch._grouped_mm`` (CUTLASS), the rest ours.

At the Qwen3-30B-A3B layer shape on an H200, CUTLASS's grouped GEMM ran the expert GEMMs at 0.52 PFLOP/s
against 0.33 for the Triton row GEMMs in ``moe.py``, while the engine's device-side routing took about 1 ms
of a step against about 7 ms for the routing Inductor generates around transformers' grouped_mm experts.
This path keeps the routing, gathers the GEMMs' input rows into expert order (the input again in backward,
rather than keeping a copy), and puts everything between the GEMMs into the row kernels of ``moe_rows.py``;
it computes the same quantities, in the same row order, as ``moe.py``, without atomics.

Only bf16 on compute capability 9.x: torch's CUTLASS grouped GEMM is bf16-only, and on Blackwell it has left
the weight gradient of an expert with no rows unwritten (pytorch/pytorch#172439). Offsets are int32, so
``T * K`` must stay below 2**31. Every other case takes the Triton GEMMs.
"""

from __future__ import annotations

import torch

from engine.kernels.triton.ops.moe_routing import Routing
from engine.kernels.triton.ops.moe_rows import gather_sum, swiglu_rows, swiglu_rows_backward

_INT32_ROWS = 2**31


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _cutlass_layout(t: torch.Tensor) -> bool:
    """Row- or column-major last two dims with 16-byte aligned strides and start, as CUTLASS requires.

    The start is judged by the storage offset (allocations themselves are aligned), which traced tensors have too.
    """
    aligned = 16 // t.element_size()
    rows_stride, cols_stride = t.stride(-2), t.stride(-1)
    if t.storage_offset() % aligned or t.stride(0) % aligned:
        return False
    return (cols_stride == 1 and rows_stride % aligned == 0) or (rows_stride == 1 and cols_stride % aligned == 0)


def weights_fit(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, device: torch.device) -> bool:
    """Whether bf16 calls with these expert weights on ``device`` take this path (known at plan time)."""
    return (
        hasattr(torch, "_grouped_mm")
        and gate_up_proj.dtype == down_proj.dtype == torch.bfloat16
        and _hopper(device)
        and gate_up_proj.shape[2] % 8 == 0
        and down_proj.shape[2] % 8 == 0
        and _cutlass_layout(gate_up_proj)
        and _cutlass_layout(down_proj)
    )


def fits(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, rows: int) -> bool:
    """Whether this call's expert GEMMs go to ``torch._grouped_mm``."""
    return x.dtype == torch.bfloat16 and 0 < rows < _INT32_ROWS and weights_fit(gate_up_proj, down_proj, x.device)


def _in_expert_order(t: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Token rows ``t[token_of_row]``, the grouped GEMMs' row operand. An ``index_select``, not a kernel of ours:
    compiled, Inductor fuses it with the ops that produce ``t`` (measured on an H200, a Triton gather of our own
    made the compiled Qwen3-MoE step about 1.4 ms slower at equal GPU time)."""
    return t.index_select(0, routing.token_of_row)


def _offsets(routing: Routing) -> torch.Tensor:
    """Each expert's end row, the ``offs`` of ``torch._grouped_mm``."""
    return routing.expert_end.to(torch.int32)


def forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    row_weight: torch.Tensor,
    routing: Routing,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, H], gate_up pre-activation [T*K, 2I], an empty tensor), as ``moe._forward`` returns them.

    The activation is not kept for backward: ``swiglu_rows_backward`` recomputes it from ``gate_up`` exactly as
    stored here, which saves ``T * K * I`` elements per layer at no extra memory traffic.
    """
    offs = _offsets(routing)
    x_rows = _in_expert_order(x, routing)
    gate_up = torch._grouped_mm(x_rows, gate_up_proj.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(swiglu_rows(gate_up), down_proj.transpose(1, 2), offs=offs)
    out = gather_sum(y, routing.inverse, x.shape[0], top_k, x.dtype, row_scale=row_weight)
    return out, gate_up, gate_up.new_empty(0)


def backward(
    d_out: torch.Tensor,
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up: torch.Tensor,
    row_weight: torch.Tensor,
    routing: Routing,
    top_k: int,
    want_dx: bool,
    want_d_gate_up_proj: bool,
    want_d_down_proj: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_gate_up_proj, d_down_proj, d_row_weight) as ``moe._backward`` returns them.

    With ``y = act @ down^T`` per expert and ``out[t] = sum_k w * y``: ``d_act = (d_out @ down) * w``, the
    routing-weight gradient is ``<d_out @ down, act>``, and ``d_down = d_out^T @ (w * act)`` per expert.
    """
    offs = _offsets(routing)
    d_rows = _in_expert_order(d_out, routing)
    d_act = torch._grouped_mm(d_rows, down_proj, offs=offs)
    d_gate_up, act_scaled, d_row_weight = swiglu_rows_backward(gate_up, d_act, row_weight)
    empty = x.new_empty(0)
    d_down = torch._grouped_mm(d_rows.t(), act_scaled, offs=offs) if want_d_down_proj else empty
    d_x = empty
    if want_dx:
        d_x_rows = torch._grouped_mm(d_gate_up, gate_up_proj, offs=offs)
        d_x = gather_sum(d_x_rows, routing.inverse, x.shape[0], top_k, x.dtype)
    d_gate_up_proj = empty
    if want_d_gate_up_proj:
        x_rows = _in_expert_order(x, routing)
        d_gate_up_proj = torch._grouped_mm(d_gate_up.t(), x_rows, offs=offs)
    return d_x, d_gate_up_proj, d_down, d_row_weight
