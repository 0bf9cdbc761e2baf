"""Mapping a patched call's arguments onto the parameters a kernel receives.

A patched forward must accept whatever the original accepts, positionally or by keyword. At plan time the
original's signature is read once into a :class:`Binder`; each call is then mapped with plain tuple and dict
operations (cheap, and traceable by Dynamo). A call that sets a parameter the kernel does not take to a
non-default value cannot be served by the kernel: ``bind`` returns ``None`` and the original runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Binder:
    names: tuple[str, ...]  # the original's positional-or-keyword parameters, without self
    defaults: tuple[Any, ...]  # per name; ``_REQUIRED`` where there is none
    wanted: int  # the kernel receives the first ``wanted`` parameters

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        """The kernel's arguments for this call, or ``None`` when only the original can serve it."""
        if not kwargs and len(args) == self.wanted:
            return args
        if len(args) > len(self.names):
            return None
        values = list(args) + list(self.defaults[len(args) :])
        for key, value in kwargs.items():
            if key not in self.names:
                return None  # a **kwargs entry or an unknown name: the original decides
            index = self.names.index(key)
            if index < len(args):
                return None  # given twice: let the original raise its own TypeError
            values[index] = value
        head = values[: self.wanted]
        if any(v is _REQUIRED for v in head):
            return None
        for value, default in zip(values[self.wanted :], self.defaults[self.wanted :], strict=True):
            if value is not default and not (default is not _REQUIRED and _same_constant(value, default)):
                return None
        return tuple(head)


def _same_constant(value: Any, default: Any) -> bool:
    return (
        type(value) is type(default) and isinstance(value, int | float | str | bool | type(None)) and value == default
    )


def binder_for(fn: Callable[..., Any], wanted: int, drop_self: bool) -> Binder | str:
    """The binder of ``fn`` for a kernel receiving its first ``wanted`` parameters, or why there is none."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "target has no inspectable signature"
    if drop_self and params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]
    plain = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(plain) < wanted:
        return f"target takes {len(plain)} positional parameter(s), the kernel needs {wanted}"
    return Binder(
        names=tuple(p.name for p in plain),
        defaults=tuple(p.default for p in plain),
        wanted=wanted,
    )
