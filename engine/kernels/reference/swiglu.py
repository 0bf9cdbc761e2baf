"""SwiGLU activation reference: ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation of a llama-style MLP, in the input dtype like transformers."""
    return F.silu(gate) * up
