"""Finds spec files: the built-in ``kernel_specs/`` folder, ``ENGINE_KERNEL_SPECS`` folders, and caller folders."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from engine.errors import SpecError
from engine.spec import SPEC_SUFFIXES, KernelSpec, load_spec_file

BUILTIN_SPEC_DIR = Path(__file__).resolve().parent.parent / "kernel_specs"
SPEC_PATH_ENV = "ENGINE_KERNEL_SPECS"


def spec_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    """Folders searched for specs, later ones overriding earlier ones by spec name."""
    dirs = [BUILTIN_SPEC_DIR]
    dirs += [Path(p) for p in os.environ.get(SPEC_PATH_ENV, "").split(os.pathsep) if p]
    dirs += [Path(p) for p in extra]
    return dirs


def spec_files(dirs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for folder in dirs:
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(SPEC_SUFFIXES))
    return files


def load_catalog(extra_dirs: Iterable[str | Path] = ()) -> dict[str, KernelSpec]:
    """All specs by name. A later folder's spec replaces an earlier one of the same name."""
    catalog: dict[str, KernelSpec] = {}
    for path in spec_files(spec_dirs(extra_dirs)):
        for spec in load_spec_file(path):
            catalog[spec.name] = spec
    return catalog


def find_spec(spec: str | Path | KernelSpec, extra_dirs: Iterable[str | Path] = ()) -> KernelSpec:
    """Resolve a spec given by name, by file path, or as an object."""
    if isinstance(spec, KernelSpec):
        return spec
    path = Path(spec)
    if path.name.endswith(SPEC_SUFFIXES) and path.exists():
        specs = load_spec_file(path)
        if len(specs) != 1:
            raise SpecError(f"{path}: defines {len(specs)} specs; pass one by name with its folder in extra_dirs")
        return specs[0]
    catalog = load_catalog(extra_dirs)
    if str(spec) not in catalog:
        raise SpecError(f"no spec named {str(spec)!r}; available: {', '.join(sorted(catalog)) or 'none'}")
    return catalog[str(spec)]


def specs_for_model_type(model_type: str, extra_dirs: Iterable[str | Path] = ()) -> list[KernelSpec]:
    """Specs that declare ``model_type`` among their ``model_types``."""
    return [s for s in load_catalog(extra_dirs).values() if model_type in s.model_types]
