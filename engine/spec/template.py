"""Renders ``.yaml.j2`` spec templates from untrusted folders: sandboxed, alone, and bounded.

A spec template builds a table of model families and loops over it, so it gets only the Jinja that needs:
literals, ``{% set %}``, ``{% if %}``, ``{% for %}`` (not recursive), ``{% with %}``, tests, operators, ``~``,
``range()`` and a vetted list of filters (:data:`FILTERS`). Everything else is refused before anything runs:
macros and call blocks, calling anything but ``range``, ``namespace``, block ``set`` and filter blocks, and
``include``/``import``/``extends`` (a template renders alone and reads no other file; several specs come from
one template as several YAML documents). Jinja's :class:`ImmutableSandboxedEnvironment` additionally blocks
``_``-prefixed attributes (the ``cycler.__init__.__globals__`` escape) and mutation of lists and dicts.

Bounds, without threads or signals: every loop iteration, operator, ``~``, literal, filter and output is a step
of a per-render :class:`_Budget` that also checks a wall-clock deadline, so a runaway render stops at its next
step by raising, and nothing outlives it (each render has its own environment). Every value a template builds
is measured where it is built (at most ``template_value`` characters plus items), so one step costs at most
that much work, and the output stops at ``template_output`` characters.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.exceptions import TemplateSyntaxError
from jinja2.filters import FILTERS as JINJA_FILTERS
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from engine.errors import SpecError
from engine.spec.documents import one_line
from engine.spec.limits import DEFAULT_LIMITS, SpecLimits

FILTERS = (
    *("abs", "capitalize", "count", "d", "default", "dictsort", "first", "float", "int", "items", "join", "last"),
    *("length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round"),
    *("select", "selectattr", "sort", "string", "title", "trim", "unique", "upper"),
)
"""Filters a spec template may use: each returns at most a constant times its input's size (``join``,
``replace`` and ``string`` are bounded versions)."""

_MAX_INT_BITS = 4096
_FEATURES: dict[type[nodes.Node], str] = {
    nodes.Include: "include (a template reads no other file)",
    nodes.Import: "import (a template reads no other file)",
    nodes.FromImport: "import (a template reads no other file)",
    nodes.Extends: "extends (a template reads no other file)",
    nodes.Block: "blocks",
    nodes.Macro: "macros",
    nodes.CallBlock: "call blocks",
    nodes.AssignBlock: "block set",
    nodes.FilterBlock: "filter blocks",
    nodes.NSRef: "namespace attributes",
}
_ALLOWED = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.Const,
    nodes.Name,
    nodes.List,
    nodes.Tuple,
    nodes.Dict,
    nodes.Pair,
    nodes.Keyword,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Slice,
    nodes.For,
    nodes.If,
    nodes.CondExpr,
    nodes.Assign,
    nodes.With,
    nodes.Filter,
    nodes.Test,
    nodes.Compare,
    nodes.Operand,
    nodes.And,
    nodes.Or,
    nodes.Not,
    nodes.Neg,
    nodes.Pos,
    nodes.BinExpr,
    nodes.Concat,
    nodes.Call,
)


class TemplateLimitError(Exception):
    """A render went past one of its :class:`SpecLimits`."""


class _Budget:
    """Steps, value size and deadline of one render."""

    def __init__(self, limits: SpecLimits) -> None:
        self.limits = limits
        self.steps_left = limits.template_steps
        self.deadline = time.monotonic() + limits.template_seconds

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise TemplateLimitError(f"more than {self.limits.template_steps} steps (loop iterations, operations)")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"render took longer than {self.limits.template_seconds} s")

    def measure(self, value: Any) -> Any:
        """``value`` itself, once its characters plus items (shared parts counted each time) are within limits."""
        left, pending = self.limits.template_value, [value]
        while pending:
            item = pending.pop()
            if isinstance(item, str):
                left -= 1 + len(item)
            elif isinstance(item, dict):
                left -= 1 + 2 * len(item)
                if left >= 0:
                    pending += [*item.keys(), *item.values()]
            elif isinstance(item, list | tuple | set | frozenset):
                left -= 1 + len(item)
                if left >= 0:
                    pending += item
            elif isinstance(item, int) and item.bit_length() > _MAX_INT_BITS:
                left = -1
            else:
                left -= 1
            if left < 0:
                raise TemplateLimitError(f"a value larger than {self.limits.template_value} characters and items")
        return value

    def text(self, value: Any) -> str:
        """``str(value)``, refused when it would be larger than a value may be."""
        text = value if isinstance(value, str) else str(self.measure(value))
        if len(text) > self.limits.template_value:
            raise TemplateLimitError(f"a text longer than {self.limits.template_value} characters")
        return text


class _Checker:
    """Refuses template features spec templates do not get, naming the line."""

    def __init__(self, allowed_filters: Iterable[str]) -> None:
        self.filters = set(allowed_filters)

    def check(self, tree: nodes.Template) -> None:
        for node in tree.find_all(nodes.Node):
            problem = self._problem(node)
            if problem:
                raise TemplateSyntaxError(f"spec templates cannot use {problem}", node.lineno)

    def _problem(self, node: nodes.Node) -> str | None:
        if not isinstance(node, _ALLOWED):
            return _FEATURES.get(type(node), f"the {type(node).__name__} construct")
        if isinstance(node, nodes.For) and node.recursive:
            return "a recursive loop"
        if isinstance(node, nodes.Filter) and node.name not in self.filters:
            return f"the filter {node.name!r} (they have: {', '.join(FILTERS)})"
        if isinstance(node, nodes.Call) and not (isinstance(node.node, nodes.Name) and node.node.name == "range"):
            return "calls, except of range()"
        return None


def _filter(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Metering(NodeTransformer):
    """Routes loops, ``~`` and literals through the budget's filters (named so no template can call them)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = _filter(node.iter, " iter")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        parts = [self.visit(part) for part in node.nodes]
        return _filter(nodes.List(parts, lineno=node.lineno), " concat")

    def visit_List(self, node: nodes.List) -> nodes.Filter:
        return _filter(self.generic_visit(node), " value")

    def visit_Dict(self, node: nodes.Dict) -> nodes.Filter:
        return _filter(self.generic_visit(node), " value")

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Expr:
        node = self.generic_visit(node)
        return node if node.ctx == "store" else _filter(node, " value")


class SpecTemplateEnvironment(ImmutableSandboxedEnvironment):
    """One render's environment: sandboxed, nothing to load, every operation metered by its budget."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, limits: SpecLimits = DEFAULT_LIMITS) -> None:
        self.budget = _Budget(limits)
        self._range_fn = self._range  # one bound method, so `call` can recognise it
        super().__init__(
            undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False, finalize=self._finalize
        )
        self.globals = {"range": self._range_fn}
        self.filters = {name: self._metered(JINJA_FILTERS[name]) for name in FILTERS}
        self.filters.update(join=self._join, replace=self._replace, string=self._string)
        self.filters.update({" iter": self._iter, " value": self._value, " concat": self._concat})

    # -- hooks Jinja calls ------------------------------------------------------------------------------------
    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if __obj is not __self._range_fn:
            raise SecurityError(f"calling {getattr(__obj, '__name__', type(__obj).__name__)} is not allowed")
        return __context.call(__obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.budget.step()
        if operator == "%" and isinstance(left, str):
            raise SecurityError("'%' string formatting is not available; build text with '~'")
        if operator in ("*", "**"):
            self._check_growth(operator, left, right)
        return self.budget.measure(self.binop_table[operator](left, right))

    def _check_growth(self, operator: str, left: Any, right: Any) -> None:
        ints = [x for x in (left, right) if isinstance(x, int)]
        if len(ints) == 2:
            base, other = left, right
            bits = base.bit_length() * max(other, 0) if operator == "**" else base.bit_length() + other.bit_length()
            if operator == "**" and abs(base) <= 1:
                bits = 1
            if bits > _MAX_INT_BITS:
                raise TemplateLimitError(f"an integer larger than {_MAX_INT_BITS} bits")
        elif operator == "*" and len(ints) == 1:
            times, limit = ints[0], self.budget.limits.template_value
            sequence = right if left is times else left
            if isinstance(sequence, str | list | tuple) and len(sequence) * times > limit:
                raise TemplateLimitError(f"a value larger than {limit} items")

    def _finalize(self, value: Any) -> str:
        self.budget.step()
        return self.budget.text(value)

    # -- globals and filters ----------------------------------------------------------------------------------
    def _range(self, *args: int) -> range:
        self.budget.step()
        numbers = range(*args)
        try:
            too_long = len(numbers) > self.budget.limits.template_value
        except OverflowError:
            too_long = True
        if too_long:
            raise TemplateLimitError(f"a range longer than {self.budget.limits.template_value}")
        return numbers

    def _metered(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def metered(*args: Any, **kwargs: Any) -> Any:
            self.budget.step()
            result = fn(*args, **kwargs)
            if isinstance(result, Iterator):
                return self._iter(result)
            return self.budget.measure(result)

        return metered

    def _iter(self, value: Iterable[Any]) -> Iterator[Any]:
        for item in value:
            self.budget.step()
            yield item

    def _value(self, value: Any) -> Any:
        self.budget.step()
        return self.budget.measure(value)

    def _concat(self, parts: list[Any]) -> str:
        return self._join(parts)

    def _join(self, value: Iterable[Any], separator: str = "") -> str:
        self.budget.step()
        separator = self.budget.text(separator)
        pieces, total, limit = [], 0, self.budget.limits.template_value
        for item in value:
            pieces.append(self.budget.text(item))
            total += len(pieces[-1]) + (len(separator) if len(pieces) > 1 else 0)
            if total > limit:
                raise TemplateLimitError(f"a text longer than {limit} characters")
        return separator.join(pieces)

    def _replace(self, value: Any, old: Any, new: Any, count: int | None = None) -> str:
        self.budget.step()
        text, old, new = self.budget.text(value), self.budget.text(old), self.budget.text(new)
        hits = text.count(old) if old else len(text) + 1
        if count is not None:
            hits = min(hits, max(count, 0))
        if len(text) + hits * (len(new) - len(old)) > self.budget.limits.template_value:
            raise TemplateLimitError(f"a text longer than {self.budget.limits.template_value} characters")
        return text.replace(old, new, -1 if count is None else count)

    def _string(self, value: Any) -> str:
        self.budget.step()
        return self.budget.text(value)


def _template_line(tb: TracebackType | None) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render_template(
    text: str, source: str | Path, variables: dict[str, Any] | None = None, limits: SpecLimits = DEFAULT_LIMITS
) -> str:
    """Render a spec template, or raise a one-line :class:`SpecError` naming ``source`` (and the line)."""
    env = SpecTemplateEnvironment(limits)
    try:
        tree = env.parse(text)
        _Checker(FILTERS).check(tree)
        tree = _Metering().visit(tree)
        tree.set_environment(env)
        template = env.from_string(tree)
        pieces, total = [], 0
        for piece in template.generate(**(variables or {})):
            total += len(piece)
            if total > limits.template_output:
                raise TemplateLimitError(f"output longer than {limits.template_output} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateSyntaxError as exc:
        raise SpecError(f"{source}: template error at line {exc.lineno}: {one_line(exc.message)}") from None
    except RecursionError:
        raise SpecError(f"{source}: template error: nested too deeply") from None
    except Exception as exc:  # a template's runtime error is the spec author's, whatever its type
        line = _template_line(exc.__traceback__)
        where = f" at line {line}" if line else ""
        kind = "stopped" if isinstance(exc, TemplateLimitError) else f"error{where}: {type(exc).__name__}"
        raise SpecError(f"{source}: template {kind}: {one_line(exc)}") from None
