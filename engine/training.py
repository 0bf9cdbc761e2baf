"""Training YAML support: ``use_v1_kernels: true`` applies every available kernel to the model.

Recognised keys (others are left to the trainer):

    use_v1_kernels: true        # enable all automatic kernels for the model on the detected device
    kernel_spec: qwen3_moe      # optional: apply this spec instead (manual entries included)
    kernel_device: cuda         # optional: override device detection
    kernel_spec_dirs: [./my_specs]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from engine.api import apply
from engine.errors import SpecError
from engine.patching import PatchHandle


class KernelTrainingOptions(BaseModel):
    """The kernel-related part of a training config."""

    model_config = ConfigDict(extra="ignore")
    use_v1_kernels: bool = False
    kernel_spec: str | None = None
    kernel_device: str | None = None
    kernel_spec_dirs: list[str] = Field(default_factory=list)


def read_training_options(config: str | Path | dict[str, Any]) -> KernelTrainingOptions:
    """Parse a training YAML file (or an already-loaded mapping)."""
    source = "training config"
    if not isinstance(config, dict):
        source = str(config)
        config = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    try:
        return KernelTrainingOptions.model_validate(config)
    except ValidationError as exc:
        raise SpecError(f"{source}: {exc}") from None


def apply_training_config(model: nn.Module, config: str | Path | dict[str, Any]) -> PatchHandle | None:
    """Apply kernels as a training config asks; ``None`` when ``use_v1_kernels`` is off."""
    options = read_training_options(config)
    if not options.use_v1_kernels:
        return None
    return apply(model, options.kernel_spec, options.kernel_device, options.kernel_spec_dirs)
