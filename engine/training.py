"""Training YAML support: ``use_v1_kernels: true`` applies every available kernel to the model.

Recognised keys (others are left to the trainer):

    use_v1_kernels: true        # enable all automatic kernels for the model on the detected device
    kernel_spec: qwen3_moe      # optional: apply this spec instead (manual entries included)
    kernel_device: cuda         # optional: override device detection
    kernel_spec_dirs: [./my_specs]
    kernel_allow_modules: [my_models]   # optional: modules beyond transformers that function targets may name

The file is read like a spec file (bounded size, nesting and aliases); any problem with it or with the kernel
keys is a one-line :class:`SpecError` naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from engine.api import apply
from engine.catalog import find_spec, load_catalog
from engine.device import validate_device
from engine.errors import SpecError
from engine.patching import PatchHandle
from engine.spec.allow import normalize
from engine.spec.documents import parse_yaml, problem_text, read_text


class KernelTrainingOptions(BaseModel):
    """The kernel-related part of a training config."""

    model_config = ConfigDict(extra="ignore")
    use_v1_kernels: bool = False
    kernel_spec: str | None = None
    kernel_device: str | None = None
    kernel_spec_dirs: list[str] = Field(default_factory=list)
    kernel_allow_modules: list[str] = Field(default_factory=list)

    @field_validator("kernel_device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        return None if value is None else str(validate_device(value, source="kernel_device"))

    @field_validator("kernel_allow_modules")
    @classmethod
    def _module_paths(cls, value: list[str]) -> list[str]:
        try:
            normalize(value, "kernel_allow_modules")
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        return value


def _read_mapping(path: Path) -> dict[str, Any]:
    documents = parse_yaml(read_text(path), path)
    if len(documents) > 1:
        raise SpecError(f"{path}: a training config is one YAML document, found {len(documents)}")
    config = documents[0] if documents else {}
    if not isinstance(config, dict):
        raise SpecError(f"{path}: a training config must be a mapping, got {type(config).__name__}")
    return config


def read_training_options(config: str | Path | dict[str, Any]) -> KernelTrainingOptions:
    """Parse a training YAML file (or an already-loaded mapping)."""
    source = "training config"
    if not isinstance(config, dict):
        source = str(config)
        config = _read_mapping(Path(config))
    try:
        return KernelTrainingOptions.model_validate(config)
    except ValidationError as exc:
        problems = [
            f"key {'.'.join(str(p) for p in err['loc']) or '<config>'!r}: {problem_text(err)}" for err in exc.errors()
        ]
        raise SpecError(f"{source}: {'; '.join(problems)}") from None


def apply_training_config(model: nn.Module, config: str | Path | dict[str, Any]) -> PatchHandle | None:
    """Apply kernels as a training config asks; ``None`` when ``use_v1_kernels`` is off."""
    options = read_training_options(config)
    if not options.use_v1_kernels:
        return None
    dirs, allow = options.kernel_spec_dirs, options.kernel_allow_modules
    try:  # resolved here so a bad name or folder is reported against the training config
        spec = find_spec(options.kernel_spec, dirs, allow) if options.kernel_spec else None
        if spec is None:
            load_catalog(dirs, allow)
    except SpecError as exc:
        key = "kernel_spec" if options.kernel_spec else "kernel_spec_dirs"
        source = "training config" if isinstance(config, dict) else str(config)
        raise SpecError(f"{source}: key {key!r}: {exc}") from None
    return apply(model, spec, options.kernel_device, dirs, allow_modules=allow)
