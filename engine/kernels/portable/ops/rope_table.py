"""``engine::rope_table``: the rotary ``(cos, sin)`` table as one operator the compiler cannot see into.

The body is the kind's reference math, run as is (eagerly, also inside a compiled graph, where it is an extern
call): the compiler gets the table as a tensor to read instead of a formula to inline into its consumers.
"""

from __future__ import annotations

import torch

from engine.kernels.kinds.rope_table import reference


@torch.library.custom_op("engine::rope_table", mutates_args=())
def rope_table(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[*position_ids.shape, 2 * len(inv_freq)]`` in ``dtype`` on ``inv_freq``'s device."""
    with torch.autocast(inv_freq.device.type, enabled=False):
        return reference(inv_freq, position_ids.to(inv_freq.device), scaling, dtype)


@rope_table.register_fake
def _fake(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*position_ids.shape, 2 * inv_freq.shape[0])
    return inv_freq.new_empty(shape, dtype=dtype), inv_freq.new_empty(shape, dtype=dtype)
