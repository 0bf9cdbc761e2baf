"""Device-side routing metadata for the fused MoE: no host sync, sizes known from shapes alone.

Token copies (t, k) are sorted by expert (stable). Expert e owns sorted rows [start[e], end[e]) and
``ceil(count / BLOCK_M)`` tiles; the launch covers the static upper bound ``ceil(T*K / BLOCK_M) + E`` tiles and
tiles past the last real one carry expert ``E`` and exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    order: torch.Tensor  # [TK] int64: sorted row -> flat (t*K + k) index
    inverse: torch.Tensor  # [TK] int64: flat index -> sorted row
    token_of_row: torch.Tensor  # [TK] int64: sorted row -> token
    expert_start: torch.Tensor  # [E] int64
    expert_end: torch.Tensor  # [E] int64
    tile_expert: torch.Tensor  # [max_tiles] int64 (E = inactive tile)
    tile_row_start: torch.Tensor  # [max_tiles] int64
    block_m: int

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.numel()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The index tensors in field order (operator arguments); ``from_tensors`` rebuilds the routing."""
        return (
            self.order,
            self.inverse,
            self.token_of_row,
            self.expert_start,
            self.expert_end,
            self.tile_expert,
            self.tile_row_start,
        )

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...], block_m: int) -> Routing:
        return cls(*tensors, block_m)


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """Sort token copies by expert and lay out GEMM tiles, all on the index tensor's device."""
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1).to(torch.int32)  # int32 keys: half the radix-sort passes of int64
    sorted_experts, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int32)
    edges = torch.searchsorted(sorted_experts, bounds)  # first row of each expert, and the total
    start, end = edges[:-1], edges[1:]
    tiles = (end - start + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    max_tiles = (flat.numel() + block_m - 1) // block_m + num_experts
    tile_ids = torch.arange(max_tiles, device=flat.device, dtype=torch.int64)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)
    safe = tile_expert.clamp(max=num_experts - 1)
    tile_row_start = start[safe] + (tile_ids - (tile_end - tiles)[safe]) * block_m
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=flat.device, dtype=torch.int64)
    return Routing(
        order, inverse, order // top_k, start.contiguous(), end.contiguous(), tile_expert, tile_row_start, block_m
    )
