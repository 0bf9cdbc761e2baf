"""Spec files: pydantic models and loading of YAML, TOML and Jinja2-templated YAML.

A file holds one spec (YAML, TOML) or several (multi-document YAML, usually rendered from a ``.j2`` template).
Any validation failure raises :class:`SpecError` naming the file, the spec, the entry and the field.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jinja2
import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from engine.device import DeviceType
from engine.errors import SpecError
from engine.kernels.kinds import KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC_SUFFIXES = (".yaml", ".yml", ".toml", ".yaml.j2", ".yml.j2")


class Target(BaseModel):
    """What to replace: a module class (name or dotted path) or a module-level function (dotted path)."""

    model_config = ConfigDict(extra="forbid")
    module_class: str | None = Field(None, description="class name, e.g. Qwen3RMSNorm, or dotted path")
    function: str | None = Field(
        None, description="dotted path, e.g. transformers.models.llama.modeling_llama.apply_rotary_pos_emb"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.module_class is None) == (self.function is None):
            raise ValueError("set exactly one of `module_class` or `function`")
        if self.function is not None and "." not in self.function:
            raise ValueError("`function` must be a dotted path: package.module.function_name")
        return self

    @property
    def label(self) -> str:
        return self.module_class or self.function or "?"


class SpecEntry(BaseModel):
    """One replacement: which target, which kernel kind, and (only where an entry needs them) restrictions."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9_\-\.]+$")
    kernel: str = Field(description="kernel kind: " + ", ".join(KINDS))
    target: Target
    devices: list[DeviceType] | None = Field(
        None, description="restrict to these devices (default: every device with a registered kernel)"
    )
    auto_register: bool | None = Field(
        None,
        description="false: applied only by an explicit spec or apply_kernel; unset: the kernel class decides",
    )
    transformers: str | None = Field(None, description="extra PEP 440 range beyond the package's, e.g. '<6'")
    when: dict[str, Any] = Field(default_factory=dict, description="config attribute -> required value (or list)")
    options: dict[str, Any] = Field(default_factory=dict, description="kernel options, checked per kernel kind")
    _parsed_options: BaseModel | None = PrivateAttr(None)

    @field_validator("kernel")
    @classmethod
    def _known_kernel(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown kernel {value!r}; known: {', '.join(KINDS)}")
        return value

    @field_validator("transformers")
    @classmethod
    def _valid_range(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                SpecifierSet(value)
            except InvalidSpecifier as exc:
                raise ValueError(f"not a version range: {exc}") from None
        return value

    @model_validator(mode="after")
    def _options_and_target_fit(self) -> SpecEntry:
        kind = KINDS[self.kernel]
        given = "module_class" if self.target.module_class else "function"
        wanted = "module_class" if kind.target == "module" else "function"
        if given != wanted:
            raise ValueError(f"kernel {self.kernel!r} replaces a {kind.target}: use target.{wanted}")
        self._parsed_options = kind.options.model_validate(self.options)
        return self

    @property
    def parsed_options(self) -> BaseModel:
        """The options as the kind's model (validated once, when the entry was)."""
        assert self._parsed_options is not None
        return self._parsed_options


class KernelSpec(BaseModel):
    """A model family's spec: its model types and its entries."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9_\-\.]+$")
    description: str = ""
    model_types: list[str] = Field(min_length=1, description="config.model_type values this spec serves")
    entries: list[SpecEntry] = Field(min_length=1)
    source: str | None = Field(None, exclude=True, description="file it was loaded from (set by the loader)")

    @model_validator(mode="after")
    def _unique_entry_names(self) -> KernelSpec:
        seen: set[str] = set()
        for entry in self.entries:
            if entry.name in seen:
                raise ValueError(f"duplicate entry name {entry.name!r}")
            seen.add(entry.name)
        return self


def _describe_location(raw: dict[str, Any], loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    if len(loc) >= 2 and loc[0] == "entries" and isinstance(loc[1], int):
        entries = raw.get("entries") or []
        name = entries[loc[1]].get("name") if loc[1] < len(entries) and isinstance(entries[loc[1]], dict) else None
        parts.append(f"entry {loc[1]}" + (f" ({name!r})" if name else ""))
        field_path = [str(p) for p in loc[2:]]
    else:
        field_path = [str(p) for p in loc]
    parts.append(f"field {'.'.join(field_path) or '<entry>'!r}")
    return ", ".join(parts)


def validate_spec(raw: Any, source: str) -> KernelSpec:
    """Validate one raw mapping into a :class:`KernelSpec`, or raise a :class:`SpecError` that points at it."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a mapping, got {type(raw).__name__}")
    try:
        spec = KernelSpec.model_validate(raw)
    except ValidationError as exc:
        spec_name = raw.get("name", "?")
        lines = [
            f"{source}: spec {spec_name!r}: {_describe_location(raw, tuple(err['loc']))}: {err['msg']}"
            for err in exc.errors()
        ]
        raise SpecError("\n".join(lines)) from None
    spec.source = source
    return spec


def _read_documents(path: Path, variables: dict[str, Any]) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    name = path.name
    if name.endswith(".j2"):
        try:
            env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
            text = env.from_string(text).render(**variables)
        except jinja2.TemplateError as exc:
            raise SpecError(f"{path}: template error: {exc}") from None
        name = name[: -len(".j2")]
    try:
        if name.endswith(".toml"):
            return [tomllib.loads(text)]
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: cannot parse: {exc}") from None


def load_spec_file(path: str | Path, variables: dict[str, Any] | None = None) -> list[KernelSpec]:
    """Load every spec a file defines (one per YAML document)."""
    path = Path(path)
    if not path.name.endswith(SPEC_SUFFIXES):
        raise SpecError(f"{path}: unsupported spec file type; use one of {', '.join(SPEC_SUFFIXES)}")
    docs = _read_documents(path, variables or {})
    if not docs:
        raise SpecError(f"{path}: file defines no spec")
    source = str(path)
    return [validate_spec(doc, source if len(docs) == 1 else f"{source} [document {i}]") for i, doc in enumerate(docs)]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec document (committed under ``schemas/``)."""
    schema = KernelSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "engine kernel spec"
    return schema
