"""Reading untrusted YAML and TOML text into plain Python data, within :class:`SpecLimits`.

Every failure is a one-line :class:`SpecError` naming the file: a file too large or not UTF-8, a parse error
(with its line), nesting too deep, or YAML aliases that expand past ``expanded_size``. PyYAML's safe loader
shares one object per anchor, so a "billion laughs" file builds quickly; it is what reads the result as a tree
(validation, printing) that explodes. The composer below therefore counts each alias every time it is used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic_core import ErrorDetails
from yaml.composer import ComposerError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

from engine.errors import SpecError
from engine.spec.limits import DEFAULT_LIMITS, SpecLimits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(text).split())


def problem_text(error: ErrorDetails) -> str:
    """One pydantic error's message in one line, without pydantic's "Value error, " prefix."""
    return one_line(error["msg"]).removeprefix("Value error, ")


def read_text(path: Path, limits: SpecLimits = DEFAULT_LIMITS) -> str:
    """The file's text, refusing a missing, oversized or non-UTF-8 file with a :class:`SpecError`."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limits.file_bytes + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limits.file_bytes:
        raise SpecError(f"{path}: larger than {limits.file_bytes} bytes; spec files are a few KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}, line {line}: {exc.reason})") from None


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader with a nesting limit and a limit on the size after alias expansion."""

    def __init__(self, stream: str, limits: SpecLimits) -> None:
        super().__init__(stream)
        self._limits = limits
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> size with aliases expanded; nodes live until the end
        self._total = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(AliasEvent):
            used = self.anchors.get(self.peek_event().anchor)
            if used is not None and id(used) not in self._sizes:  # still being composed: it contains the alias
                self._refuse("an alias refers to a node that contains it (recursive alias)")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > self._limits.depth:
                self._refuse(f"nested deeper than {self._limits.depth} levels")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._size(node)
        if parent is None:
            self._total += size
            size = self._total
        if size > self._limits.expanded_size:
            self._refuse(f"expands to more than {self._limits.expanded_size} nodes and characters (aliases)")
        return node

    def _size(self, node: Node) -> int:
        """Size of a just-composed node, its aliased children counted in full (their sizes are known)."""
        if isinstance(node, SequenceNode):
            size = 1 + sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        else:
            size = 1 + len(node.value)
        self._sizes[id(node)] = size
        return size

    def _refuse(self, problem: str) -> None:
        raise ComposerError(None, None, problem, self.peek_event().start_mark if self.check_event() else None)


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        context = getattr(exc, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return one_line(f"{where}: {context + ': ' if context else ''}{problem}")
    return one_line(exc)


def parse_yaml(text: str, source: str | Path, limits: SpecLimits = DEFAULT_LIMITS) -> list[Any]:
    """Every non-empty document of a YAML text, within ``limits``."""
    loader = _BoundedLoader(text, limits)
    try:
        documents = []
        while loader.check_data():
            document = loader.get_data()
            if document is not None:
                documents.append(document)
        return documents
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: cannot parse YAML: {_yaml_error(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. a 5000-digit integer
        raise SpecError(f"{source}: cannot parse YAML: {type(exc).__name__}: {one_line(exc)}") from None
    finally:
        loader.dispose()


def parse_toml(text: str, source: str | Path, limits: SpecLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """A TOML text as a mapping, within ``limits``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: cannot parse TOML: {one_line(exc)}") from None
    except RecursionError:
        raise SpecError(f"{source}: cannot parse TOML: nested deeper than {limits.depth} levels") from None
    if depth_of(document, limits.depth) > limits.depth:
        raise SpecError(f"{source}: cannot parse TOML: nested deeper than {limits.depth} levels")
    return document


def depth_of(value: Any, stop: int) -> int:
    """Levels in ``value`` (a scalar is one, each mapping or list around it one more), counted up to ``stop + 1``."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict | list | tuple) and depth <= stop:
            pending += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest
