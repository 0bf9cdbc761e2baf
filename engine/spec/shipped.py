"""Where the built-in specs and the JSON schema are: inside the installed package, or in the source checkout.

The top-level ``kernel_specs/`` and ``schemas/`` folders are the source. A wheel carries them as
``engine/kernel_specs/`` and ``engine/schemas/`` (mapped by ``pyproject.toml``); a checkout on ``PYTHONPATH``
or an editable install has no such folders inside ``engine/`` and reads the top-level ones.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent
_CHECKOUT = _PACKAGE.parent


def _shipped(folder: str) -> Path:
    inside = _PACKAGE / folder
    return inside if inside.is_dir() else _CHECKOUT / folder


BUILTIN_SPEC_DIR = _shipped("kernel_specs")
SCHEMA_PATH = _shipped("schemas") / "kernel_spec.schema.json"
