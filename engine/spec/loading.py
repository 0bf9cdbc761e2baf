"""Spec files to :class:`KernelSpec` objects: read (bounded), render (``.j2``), parse, validate.

A file holds one spec (YAML, TOML) or several (multi-document YAML, usually rendered from a ``.j2`` template).
Every failure raises a one-line :class:`SpecError` naming the file, and the spec, entry and field where there
is one; nothing a spec names is imported or run while loading.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.errors import SpecError
from engine.spec.allow import ALLOW_FILE, folder_allowance, normalize
from engine.spec.documents import parse_toml, parse_yaml, problem_text, read_text
from engine.spec.limits import DEFAULT_LIMITS, SpecLimits
from engine.spec.models import KernelSpec
from engine.spec.template import render_template

SPEC_SUFFIXES = (".yaml", ".yml", ".toml", ".yaml.j2", ".yml.j2")


def is_spec_file(path: Path) -> bool:
    """A file the catalog loads as a spec (the folder's allow-list file is not one)."""
    return path.name.endswith(SPEC_SUFFIXES) and path.name != ALLOW_FILE


def _describe_location(raw: dict[str, Any], loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    if len(loc) >= 2 and loc[0] == "entries" and isinstance(loc[1], int):
        entries = raw.get("entries") if isinstance(raw.get("entries"), list) else []
        entry = entries[loc[1]] if loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else None
        parts.append(f"entry {loc[1]}" + (f" ({name!r})" if name else ""))
        field_path = [str(p) for p in loc[2:]]
    else:
        field_path = [str(p) for p in loc]
    parts.append(f"field {'.'.join(field_path) or '<entry>'!r}")
    return ", ".join(parts)


def validate_spec(raw: Any, source: str, allow_modules: Iterable[str] = ()) -> KernelSpec:
    """Validate one raw mapping into a :class:`KernelSpec`, or raise a :class:`SpecError` that points at it."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a mapping, got {type(raw).__name__}")
    try:
        spec = KernelSpec.model_validate(raw, context={"allow_modules": normalize(allow_modules)})
    except ValidationError as exc:
        name = raw.get("name")
        spec_name = repr(name) if isinstance(name, str) else "?"
        problems = [f"{_describe_location(raw, tuple(err['loc']))}: {problem_text(err)}" for err in exc.errors()]
        raise SpecError(f"{source}: spec {spec_name}: {'; '.join(problems)}") from None
    spec.source = source
    return spec


def read_documents(path: Path, variables: dict[str, Any] | None = None, limits: SpecLimits = DEFAULT_LIMITS) -> list:
    """The documents of a spec file as plain data (a template rendered first)."""
    text = read_text(path, limits)
    name = path.name
    if name.endswith(".j2"):
        text = render_template(text, path, variables, limits)
        name = name[: -len(".j2")]
    if name.endswith(".toml"):
        return [parse_toml(text, path, limits)]
    return parse_yaml(text, path, limits)


def load_spec_file(
    path: str | Path,
    variables: dict[str, Any] | None = None,
    allow_modules: Iterable[str] = (),
    limits: SpecLimits = DEFAULT_LIMITS,
) -> list[KernelSpec]:
    """Load every spec a file defines (one per YAML document).

    Function targets may name ``transformers``, ``allow_modules`` and what the folder's ``engine-allow.toml``
    lists (see :mod:`engine.spec.allow`).
    """
    path = Path(path)
    if path.name == ALLOW_FILE:
        raise SpecError(f"{path}: is the folder's module allow-list, not a spec")
    if not is_spec_file(path):
        raise SpecError(f"{path}: unsupported spec file type; use one of {', '.join(SPEC_SUFFIXES)}")
    allowed = normalize([*normalize(allow_modules), *folder_allowance(path.parent, limits)])
    docs = read_documents(path, variables, limits)
    if not docs:
        raise SpecError(f"{path}: file defines no spec")
    source = str(path)
    return [
        validate_spec(doc, source if len(docs) == 1 else f"{source} [document {i}]", allowed)
        for i, doc in enumerate(docs)
    ]
