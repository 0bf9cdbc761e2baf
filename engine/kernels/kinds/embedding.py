"""``embedding``: a token-embedding table, ``weight[ids]``, with the table's gradient written by the kernel.

Target: an ``nn.Embedding`` that keeps ``nn.Embedding.forward`` (a subclass that scales or otherwise changes the
output, such as Gemma's scaled word embedding, is refused at plan time and runs its own forward if met later),
without ``max_norm`` (which renormalises the weight in forward), ``scale_grad_by_freq`` or sparse gradients.
``padding_idx`` rows get no gradient, as in PyTorch. The forward is the plain lookup; the kernel's work is the
backward, whose weight gradient the compiler builds in an fp32 buffer of the table's size (see the CUDA kernel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.kinds.base import KernelKind, KernelType, mismatch, probe_twin

INDEX_DTYPES = (torch.int32, torch.int64)


def reference(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``weight[ids]``; rows at ``padding_idx`` get no gradient."""
    return F.embedding(ids, weight, padding_idx)


def plain_lookup(module: nn.Module) -> bool:
    """Whether the module's class keeps ``nn.Embedding.forward`` (its output is the plain lookup)."""
    return type(module).forward is nn.Embedding.forward


def check(module: Any, options: Any) -> str | None:
    if not isinstance(module, nn.Embedding):
        return f"{type(module).__name__} is not an nn.Embedding"
    if not plain_lookup(module):
        return f"{type(module).__name__} overrides nn.Embedding.forward; its output is not the plain lookup"
    if module.max_norm is not None:
        return "max_norm renormalises the weight in forward; the kernel leaves weights alone"
    if module.scale_grad_by_freq or module.sparse:
        return "scale_grad_by_freq and sparse gradients are not supported"
    if not isinstance(module.weight, torch.Tensor) or module.weight.dim() != 2:
        return "module has no 2-D `weight`"
    return None


def probe(module: Any, options: Any) -> str | None:
    twin = probe_twin(module)
    if twin is None:
        return None
    ids = torch.arange(min(5, twin.weight.shape[0]), device=twin.weight.device).flip(0)
    with torch.no_grad():
        return mismatch(twin.forward(ids), reference(ids, twin.weight))


def fits(ids: Any) -> bool:
    """Per call: integer ids (a float or other input runs the original, which raises as PyTorch does)."""
    return isinstance(ids, torch.Tensor) and ids.dtype in INDEX_DTYPES


KIND = KernelKind("embedding", KernelType.EMBEDDING, "module", ("input",), check, probe, fits=fits)
