"""The pydantic models of a spec file: :class:`KernelSpec` holds :class:`SpecEntry` items, each with a :class:`Target`.

Validation takes an optional context ``{"allow_modules": [...]}``: the modules beyond ``transformers`` a function
target may name (see :mod:`engine.spec.allow`). Without it only ``transformers`` is allowed.
"""

from __future__ import annotations

import copy
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.device import DeviceType
from engine.errors import SpecError
from engine.kernels.kinds import KINDS
from engine.spec.allow import ALWAYS_ALLOWED, DOTTED_PATH, normalize, path_problem, refusal
from engine.spec.documents import problem_text

NAME_PATTERN = r"^[a-z0-9_\-\.]+$"


def _allowed_in(info: ValidationInfo) -> tuple[str, ...]:
    context = info.context or {}
    return normalize(context.get("allow_modules", ()))


class Target(BaseModel):
    """What to replace: a module class (name or dotted path) or a module-level function (dotted path)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module_class: str | None = Field(
        None,
        description="class name, e.g. Qwen3RMSNorm, or dotted path (matched against the model, never imported)",
        json_schema_extra={"pattern": DOTTED_PATH.pattern},
    )
    function: str | None = Field(
        None,
        description="dotted path, e.g. transformers.models.llama.modeling_llama.apply_rotary_pos_emb; "
        "its module must be under transformers or an allowed module",
        json_schema_extra={"pattern": DOTTED_PATH.pattern},
    )
    _allowed: tuple[str, ...] = PrivateAttr(ALWAYS_ALLOWED)

    @field_validator("module_class")
    @classmethod
    def _class_path(cls, value: str | None) -> str | None:
        problem = None if value is None else path_problem(value, "module_class")
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("function")
    @classmethod
    def _function_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        problem = None if value is None else refusal(value, _allowed_in(info))
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _exactly_one(self, info: ValidationInfo) -> Target:
        if (self.module_class is None) == (self.function is None):
            raise ValueError("set exactly one of `module_class` or `function`")
        self._allowed = _allowed_in(info)
        return self

    @property
    def label(self) -> str:
        return self.module_class or self.function or "?"

    def import_refusal(self) -> str | None:
        """Why the function's module may not be imported (checked again by the planner before it imports)."""
        return None if self.function is None else refusal(self.function, self._allowed)


class SpecEntry(BaseModel):
    """One replacement: which target, which kernel kind, and (only where an entry needs them) restrictions."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
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
    _parsed_from: dict[str, Any] | None = PrivateAttr(None)  # the options dict _parsed_options was parsed from

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
        self._parse_options()
        return self

    def _parse_options(self) -> None:
        self._parsed_options = KINDS[self.kernel].options.model_validate(self.options)
        self._parsed_from = copy.deepcopy(self.options)

    @property
    def parsed_options(self) -> BaseModel:
        """The options as the kind's model: parsed when the entry was validated, and again if they changed since
        (``model_copy(update=...)`` and assignment skip validation), with a one-line error naming the entry."""
        if self._parsed_options is None or self._parsed_from != self.options:
            try:
                self._parse_options()
            except ValidationError as exc:
                problems = "; ".join(
                    f"field 'options.{'.'.join(map(str, err['loc']))}': {problem_text(err)}" for err in exc.errors()
                )
                raise SpecError(f"entry {self.name!r} ({self.kernel}): {problems}") from None
        assert self._parsed_options is not None
        return self._parsed_options


class KernelSpec(BaseModel):
    """A model family's spec: its model types and its entries."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
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
