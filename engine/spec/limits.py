"""Size, depth and time limits for reading spec files, which come from folders users point at (untrusted text).

Every limit is far above what a real spec needs (a spec file is a few KB, nests about five levels and a template
renders a few dozen documents) and far below what would hurt the process reading it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecLimits:
    file_bytes: int = 1 << 20
    """Largest spec, allow-list or training file read from disk."""
    depth: int = 32
    """Deepest nesting of mappings and lists in a parsed document."""
    expanded_size: int = 2_000_000
    """YAML nodes plus scalar characters of a whole file, every alias counted each time it is used."""
    template_output: int = 1 << 20
    """Characters a template may render."""
    template_value: int = 1 << 20
    """Size (characters plus items) of any one value a template builds."""
    template_steps: int = 200_000
    """Loop iterations, operators, filters and outputs one render may take."""
    template_seconds: float = 5.0
    """Wall-clock time one render may take (checked at every step)."""


DEFAULT_LIMITS = SpecLimits()
