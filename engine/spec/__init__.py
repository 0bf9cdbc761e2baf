"""Spec files, which are untrusted input: models, bounded reading, sandboxed templates, the module allow-list.

- :mod:`~engine.spec.models`: the pydantic models (``KernelSpec``, ``SpecEntry``, ``Target``);
- :mod:`~engine.spec.loading`: file -> specs (``load_spec_file``), each failure a one-line ``SpecError``;
- :mod:`~engine.spec.documents`: YAML/TOML text -> data within :class:`~engine.spec.limits.SpecLimits`;
- :mod:`~engine.spec.template`: ``.yaml.j2`` rendering (sandboxed, no file access, bounded);
- :mod:`~engine.spec.allow`: which modules function targets may name;
- :mod:`~engine.spec.shipped`: where the built-in specs and the schema are; :mod:`~engine.spec.schema`.
"""

from engine.spec.allow import ALLOW_FILE, ALWAYS_ALLOWED
from engine.spec.limits import DEFAULT_LIMITS, SpecLimits
from engine.spec.loading import SPEC_SUFFIXES, is_spec_file, load_spec_file, validate_spec
from engine.spec.models import KernelSpec, SpecEntry, Target
from engine.spec.schema import json_schema
from engine.spec.shipped import BUILTIN_SPEC_DIR, SCHEMA_PATH

__all__ = [
    "ALLOW_FILE",
    "ALWAYS_ALLOWED",
    "BUILTIN_SPEC_DIR",
    "DEFAULT_LIMITS",
    "SCHEMA_PATH",
    "SPEC_SUFFIXES",
    "KernelSpec",
    "SpecEntry",
    "SpecLimits",
    "Target",
    "is_spec_file",
    "json_schema",
    "load_spec_file",
    "validate_spec",
]
