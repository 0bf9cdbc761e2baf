"""Tile configurations of the fused-MoE GEMMs, chosen per element size within the device's shared memory.

A Triton GEMM loop keeps ``num_stages - 1`` copies of its A tile [BLOCK_M, BLOCK_K] and of each B tile
[BLOCK_K, BLOCK_N] in shared memory (software pipelining), so one program needs

    max(1, num_stages - 1) * (BLOCK_M * BLOCK_K + b_tiles * BLOCK_K * BLOCK_N) * itemsize

bytes, ``b_tiles = 2`` for the up projection (gate and up tiles). This reproduces what Triton 3.6 reported on
an H100 for the bf16-tuned configurations run in fp32: 245760 bytes (BLOCK_M 64, BLOCK_N 128, BLOCK_K 64,
4 stages) and 294912 (BLOCK_M 128). The epilogue's layout conversion of the fp32 accumulator
(at most ``BLOCK_M * BLOCK_N * 4`` bytes) reuses that space once the loop is done, so the estimate is the
larger of the two, plus ``MARGIN`` for barriers. Each kernel takes its first candidate that fits the
device's opt-in limit (``runtime.shared_memory_limit``); the four row GEMMs share the routing tile height
BLOCK_M (64 or 128, by rows per expert). The last candidates need about 11 KB in fp32, so every CUDA GPU
fits one. No triton import here: the kernel class consults this at plan time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from engine.kernels.triton.runtime import shared_memory_limit

MARGIN = 1024


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Row GEMMs: (BLOCK_N, BLOCK_K, num_warps, num_stages) in order of preference. The first of each was tuned on
# an H100 for the Qwen3-30B-A3B expert shape in bf16 (benchmarks/bench_moe.py); the rest trade depth for fit.
ROW_GEMM_CANDIDATES: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "up_swiglu": ((128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)),
    "down_scale": ((128, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)),
    "down_dgrad_swiglu": ((64, 64, 8, 4), (64, 64, 8, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)),
    "up_dgrad": ((128, 64, 4, 4), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)),
}
B_TILES = {"up_swiglu": 2}
# Expert weight gradients: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M spans weight rows here.
WGRAD_CANDIDATES: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (128, 64, 32, 4, 3),
    (64, 64, 32, 4, 3),
    (32, 32, 32, 4, 2),
    (16, 16, 16, 4, 1),
)
ROW_BLOCK_M = (64, 128)  # the routing tile heights preferred_block_m picks from


def shared_memory_bytes(config: TileConfig, itemsize: int, b_tiles: int = 1) -> int:
    """Estimated shared memory of one program of a GEMM with this tiling (formula in the module docstring)."""
    tiles = config.block_m * config.block_k + b_tiles * config.block_k * config.block_n
    pipeline = max(1, config.num_stages - 1) * tiles * itemsize
    return max(pipeline, config.block_m * config.block_n * 4) + MARGIN


@dataclass
class MoETiles:
    block_m: int  # routing tile height, shared by the four row GEMMs
    configs: dict[str, TileConfig]  # by kernel: up_swiglu, down_scale, down_dgrad_swiglu, up_dgrad, wgrad

    def __getitem__(self, name: str) -> TileConfig:
        return self.configs[name]


def preferred_block_m(rows: int, num_experts: int) -> int:
    """Routing tile height: 128 when experts average >= 256 rows, else 64 (fewer idle rows per tile)."""
    return 128 if rows >= 256 * num_experts else 64


def _first_fit(candidates, itemsize: int, limit: int | None, b_tiles: int = 1) -> TileConfig | None:  # noqa: ANN001
    for candidate in candidates:
        config = TileConfig(*candidate)
        if limit is None or shared_memory_bytes(config, itemsize, b_tiles) <= limit:
            return config
    return None


@functools.lru_cache(maxsize=256)
def choose_tiles(block_m: int, itemsize: int, limit: int | None) -> MoETiles | None:
    """Tiles for every MoE kernel with routing tile height ``block_m``; ``None`` if some kernel has none."""
    configs = {}
    for name, candidates in ROW_GEMM_CANDIDATES.items():
        config = _first_fit([(block_m, *c) for c in candidates], itemsize, limit, B_TILES.get(name, 1))
        if config is None:
            return None
        configs[name] = config
    wgrad = _first_fit(WGRAD_CANDIDATES, itemsize, limit)
    if wgrad is None:
        return None
    return MoETiles(block_m, {**configs, "wgrad": wgrad})


def plan_tiles(rows: int, num_experts: int, dtype: torch.dtype, device: torch.device) -> MoETiles | None:
    """The tiles a fused-MoE call with ``rows = tokens * top_k`` uses on ``device``; ``None`` if none fit."""
    return choose_tiles(preferred_block_m(rows, num_experts), dtype.itemsize, shared_memory_limit(device))


def unfit_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why some call in ``dtype`` would find no tiling on ``device`` (any tile height), or ``None``."""
    limit = shared_memory_limit(device)
    if all(choose_tiles(block_m, dtype.itemsize, limit) is not None for block_m in ROW_BLOCK_M):
        return None
    return f"no fused-MoE tile configuration for {dtype} fits the {limit} bytes of shared memory on {device}"
