"""RMSNorm reference with the two casting conventions found in transformers."""

from __future__ import annotations

from typing import Literal

import torch

Casting = Literal["llama", "gemma"]


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
    casting: Casting = "llama",
) -> torch.Tensor:
    """``llama``: ``(w + offset) * (x_f32 * rstd).to(x.dtype)``; ``gemma``: all in fp32, cast at the end."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (normed * (weight.float() + weight_offset)).to(x.dtype)
    scale = weight + weight_offset if weight_offset else weight
    return scale * normed.to(x.dtype)
