"""Rotary embeddings on Ascend through ``torch_npu.npu_rotary_mul`` (rotate-half mode).

- Dtypes: q/k come back in their own dtype. With cos/sin in another dtype the rotation is computed in the
  wider one (q upcast), then cast back, as transformers' models that keep cos/sin in fp32 do; the op itself
  would first round cos/sin to q's dtype.
- Partial rotary (cos/sin narrower than the head): the first ``cos.shape[-1]`` features are rotated and the rest
  pass through, as in transformers' partial-rotary models.
- Declined, so the original runs: shapes outside the op's documented constraints (release 7.0.0+ docs: 4-D
  input, r1/r2 broadcast layouts 11SD/B1SD for BNSD and 1S1D/BS1D for BSND, rotary dim even and below 896,
  batch and heads below 1000, at most 1024 batch*heads when cos/sin need gradients).

Not checked per call (it would need a host sync): the op documents cos/sin values within [-1, 1], which
holds for transformers' default rotary embedding but not for scaled variants (attention_scaling > 1).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import FLOATS, NpuKernel, torch_npu
from engine.kernels.npu.versions import Requirement

MAX_ROTARY_DIM = 896  # exclusive
MAX_BATCH_OR_HEADS = 1000  # exclusive
MAX_GRAD_BATCH_HEADS = 1024  # when cos/sin need gradients


def rotary_fits(x: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether 4-D ``x`` and 3-D ``cos`` ([B or 1, S, rot]) meet npu_rotary_mul's documented constraints."""
    if x.dim() != 4 or cos.dim() != 3 or unsqueeze_dim not in (1, 2):
        return False
    batch, heads = (x.shape[0], x.shape[1]) if unsqueeze_dim == 1 else (x.shape[0], x.shape[2])
    seq = x.shape[2] if unsqueeze_dim == 1 else x.shape[1]
    rot = cos.shape[-1]
    return (
        cos.shape[0] in (1, batch)
        and cos.shape[1] == seq
        and 0 < rot <= x.shape[-1]
        and rot % 2 == 0
        and rot < MAX_ROTARY_DIM
        and batch < MAX_BATCH_OR_HEADS
        and heads < MAX_BATCH_OR_HEADS
        and (not cos.requires_grad or batch * heads <= MAX_GRAD_BATCH_HEADS)
    )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on the first ``cos.shape[-1]`` features of x, in x's dtype."""
    work = torch.promote_types(x.dtype, cos.dtype)
    rot = cos.shape[-1]
    part = x[..., :rot] if rot < x.shape[-1] else x
    out = torch_npu().npu_rotary_mul(part.to(work), cos.to(work), sin.to(work)).to(x.dtype)
    return torch.cat((out, x[..., rot:]), dim=-1) if rot < x.shape[-1] else out


class NpuRoPEKernel(NpuKernel):
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` for q/k of shape [B, H, S, D] (or [B, S, H, D])."""

    type = KernelType.ROPE
    device = "npu"
    min_torch_npu = Requirement("7.0.0")  # the constraints above are the 7.x ones (6.0 required D % 64 == 0)
    ops = ("npu_rotary_mul",)
    op_dtypes = {"npu_rotary_mul": frozenset((x, r) for x in FLOATS for r in FLOATS)}  # (x, r1/r2)

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:  # noqa: ANN001
        return (
            cos.shape == sin.shape
            and cos.dtype == sin.dtype
            and q.dtype == k.dtype
            and cls.accepts("npu_rotary_mul", q, cos)
            and rotary_fits(q, cos, unsqueeze_dim)
            and rotary_fits(k, cos, unsqueeze_dim)
        )

    @classmethod
    def run(
        cls,
        fn: object,
        options: BaseModel,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return rotate(q, cos, sin), rotate(k, cos, sin)
