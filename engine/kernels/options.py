"""Per-kernel-type options that a spec entry may set (validated by pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """A kernel type that takes no options."""

    model_config = ConfigDict(extra="forbid")


class RMSNormOptions(BaseModel):
    """``weight_offset=1.0`` for ``(1 + w)`` norms; ``casting`` picks where the output is rounded."""

    model_config = ConfigDict(extra="forbid")
    weight_offset: float = 0.0
    casting: Literal["llama", "gemma"] = "llama"


class MRopeOptions(BaseModel):
    """``sectioned``: Qwen2-VL / Qwen2.5-VL; ``interleaved``: Qwen3-VL."""

    model_config = ConfigDict(extra="forbid")
    layout: Literal["sectioned", "interleaved"] = "sectioned"
