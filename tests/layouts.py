"""The same tensor values in other memory layouts, to test that kernels honour strides."""

from __future__ import annotations

import torch

LAYOUTS = ["every_other", "row_padded", "transposed"]


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous tensor equal to ``t`` (a view into a larger buffer, or transposed storage).

    ``every_other``: last-dim stride 2 (e.g. ``w_big[::2]``); ``row_padded``: rows of a wider buffer (unit column
    stride, larger row stride); ``transposed``: the first two dims swapped in memory (1-D: like every_other).
    """
    if layout == "every_other" or (layout == "transposed" and t.dim() < 2):
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "row_padded":
        if t.dim() < 2:
            return relayout(t, "every_other")
        big = t.new_zeros(*t.shape[:-1], t.shape[-1] + 3)
        big[..., : t.shape[-1]] = t
        return big[..., : t.shape[-1]]
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(f"unknown layout {layout!r}")
