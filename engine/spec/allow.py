"""Which modules a spec's function targets may name: ``transformers`` unless the user allows more.

Planning imports the module a function target names, and importing runs that module's code, so a spec file
(untrusted text) may only name modules under an allowed prefix. ``transformers`` is always allowed. A user
allows more explicitly, in one of two ways; a spec file can never widen the list itself:

- ``allow_modules=["my_models"]`` on :func:`engine.apply` (and ``plan``, ``apply_available_kernels``,
  ``load_catalog``, ``load_spec_file``, ...), ``--allow-module`` on the CLI, or ``kernel_allow_modules`` in a
  training YAML;
- an ``engine-allow.toml`` file next to the specs, holding ``modules = ["my_models"]``; it covers the spec
  files of that folder only. Whoever can write that file can make the engine import their modules, so give
  write access to such a folder only to people you would let run code.

A prefix allows the module itself and its submodules (``my_models`` allows ``my_models.llama``, not
``my_models_extra``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from engine.errors import SpecError
from engine.spec.documents import parse_toml, read_text
from engine.spec.limits import DEFAULT_LIMITS, SpecLimits

ALWAYS_ALLOWED = ("transformers",)
ALLOW_FILE = "engine-allow.toml"
_SEGMENT = r"[A-Za-z_][A-Za-z0-9_]*"
DOTTED_PATH = re.compile(rf"^{_SEGMENT}(\.{_SEGMENT})*$")
"""Identifiers separated by dots (ASCII): the only shape a module, class or function path may have."""


def path_problem(path: str, what: str, min_parts: int = 1) -> str | None:
    """Why ``path`` is not a dotted path of at least ``min_parts`` identifiers, or ``None`` when it is."""
    if not DOTTED_PATH.match(path):
        return f"{what} {path!r} is not a dotted path of identifiers (letters, digits, '_' separated by '.')"
    parts = path.split(".")
    if any(part.startswith("__") for part in parts):
        return f"{what} {path!r} has a part starting with '__'; targets are plain module, class and function names"
    if len(parts) < min_parts:
        return f"{what} {path!r} needs at least {min_parts} dotted parts"
    return None


def normalize(prefixes: Iterable[str], source: str = "allow_modules") -> tuple[str, ...]:
    """``prefixes`` checked to be module paths, with the always-allowed ones first and duplicates dropped."""
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    result = list(ALWAYS_ALLOWED)
    for prefix in prefixes:
        problem = path_problem(prefix, "module") if isinstance(prefix, str) else f"{prefix!r} is not a string"
        if problem:
            raise SpecError(f"{source}: {problem}")
        if prefix not in result:
            result.append(prefix)
    return tuple(result)


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in allowed)


def refusal(function_path: str, allowed: Iterable[str]) -> str | None:
    """Why ``function_path`` may not be imported under ``allowed``, or ``None`` when it may."""
    problem = path_problem(function_path, "function", min_parts=2)
    if problem:
        return problem
    module = function_path.rpartition(".")[0]
    allowed = tuple(allowed)
    if module_allowed(module, allowed):
        return None
    return (
        f"module {module!r} is not allowed (allowed: {', '.join(allowed)}); to import it, pass "
        f"allow_modules=[{module.split('.')[0]!r}] (CLI: --allow-module) or list it in {ALLOW_FILE} next to the spec"
    )


def folder_allowance(folder: Path, limits: SpecLimits = DEFAULT_LIMITS) -> tuple[str, ...]:
    """The extra modules ``folder/engine-allow.toml`` allows (none without that file)."""
    path = folder / ALLOW_FILE
    if not path.is_file():
        return ()
    document = parse_toml(read_text(path, limits), path, limits)
    unknown = set(document) - {"modules"}
    modules = document.get("modules", [])
    if unknown or not isinstance(modules, list):
        raise SpecError(f'{path}: expected only `modules = ["package", ...]`, got keys {sorted(document)}')
    return normalize(modules, f"{path}: modules")[len(ALWAYS_ALLOWED) :]
