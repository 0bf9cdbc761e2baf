"""Finds spec files: the built-in ``kernel_specs/`` folder, ``ENGINE_KERNEL_SPECS`` folders, and caller folders.

:func:`scan_catalog` loads what it can and collects each bad file or missing folder as a :class:`SpecError`
(``engine list`` shows both); :func:`load_catalog` raises on the first, so applying never silently drops a spec.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import SpecError
from engine.spec import BUILTIN_SPEC_DIR, SPEC_SUFFIXES, KernelSpec, is_spec_file, load_spec_file, validate_spec

SPEC_PATH_ENV = "ENGINE_KERNEL_SPECS"
__all__ = ["BUILTIN_SPEC_DIR", "SPEC_PATH_ENV", "Catalog", "find_spec", "load_catalog", "scan_catalog"]


def spec_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    """Folders searched for specs, later ones overriding earlier ones by spec name."""
    if isinstance(extra, str | Path):
        extra = [extra]
    dirs = [BUILTIN_SPEC_DIR]
    dirs += [Path(p) for p in os.environ.get(SPEC_PATH_ENV, "").split(os.pathsep) if p]
    dirs += [Path(p) for p in extra]
    return dirs


def spec_files(dirs: Iterable[Path]) -> list[Path]:
    """The spec files of existing folders, sorted by name within each folder."""
    files: list[Path] = []
    for folder in dirs:
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.is_file() and is_spec_file(p))
    return files


@dataclass
class Catalog:
    """Specs by name, and the files and folders that could not be read."""

    specs: dict[str, KernelSpec] = field(default_factory=dict)
    errors: list[SpecError] = field(default_factory=list)


def scan_catalog(extra_dirs: Iterable[str | Path] = (), allow_modules: Iterable[str] = ()) -> Catalog:
    """Every spec that loads; a later folder's spec replaces an earlier one of the same name."""
    catalog = Catalog()
    dirs = spec_dirs(extra_dirs)
    for folder in dirs:
        if not folder.is_dir():
            hint = "the installed package is incomplete" if folder == BUILTIN_SPEC_DIR else "check the path"
            catalog.errors.append(SpecError(f"{folder}: spec folder does not exist ({hint})"))
    for path in spec_files(dirs):
        try:
            specs = load_spec_file(path, allow_modules=allow_modules)
        except SpecError as exc:
            catalog.errors.append(exc)
            continue
        for spec in specs:
            catalog.specs[spec.name] = spec
    return catalog


def load_catalog(extra_dirs: Iterable[str | Path] = (), allow_modules: Iterable[str] = ()) -> dict[str, KernelSpec]:
    """All specs by name; a bad spec file or a missing folder raises its :class:`SpecError`."""
    catalog = scan_catalog(extra_dirs, allow_modules)
    if catalog.errors:
        first, more = catalog.errors[0], len(catalog.errors) - 1
        if not more:
            raise first
        raise SpecError(f"{first} (and {more} more spec problem(s); `engine validate` lists them)")
    return catalog.specs


def find_spec(
    spec: str | Path | KernelSpec | Mapping[str, Any],
    extra_dirs: Iterable[str | Path] = (),
    allow_modules: Iterable[str] = (),
) -> KernelSpec:
    """Resolve a spec given by name, by file path, as an object, or as a dict (validated like a file's)."""
    if isinstance(spec, KernelSpec):
        return spec
    if isinstance(spec, Mapping):
        return validate_spec(dict(spec), "<spec dict>", allow_modules)
    path = Path(spec)
    if path.name.endswith(SPEC_SUFFIXES):
        if not path.is_file():
            raise SpecError(f"{path}: spec file not found")
        specs = load_spec_file(path, allow_modules=allow_modules)
        if len(specs) != 1:
            raise SpecError(f"{path}: defines {len(specs)} specs; pass one by name with its folder in spec_dirs")
        return specs[0]
    catalog = load_catalog(extra_dirs, allow_modules)
    if str(spec) not in catalog:
        raise SpecError(f"no spec named {str(spec)!r}; available: {', '.join(sorted(catalog)) or 'none'}")
    return catalog[str(spec)]


def specs_for_model_type(
    model_type: str, extra_dirs: Iterable[str | Path] = (), allow_modules: Iterable[str] = ()
) -> list[KernelSpec]:
    """Specs that declare ``model_type`` among their ``model_types``."""
    return [s for s in load_catalog(extra_dirs, allow_modules).values() if model_type in s.model_types]
