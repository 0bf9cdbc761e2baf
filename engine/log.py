"""Logging: the ``engine`` logger, and the patch report every apply prints (``ENGINE_VERBOSITY``).

Importing the package configures nothing (a ``NullHandler`` only, as libraries should). A patch report is logged
at INFO on ``engine``; when the application has configured no handler for it, the report goes to stderr
directly, so what was patched and skipped is never silent. ``ENGINE_VERBOSITY`` (or :func:`set_verbosity`)
raises the threshold: ``warning`` hides reports, ``error`` hides warnings too.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("engine")
logger.addHandler(logging.NullHandler())

VERBOSITY_ENV = "ENGINE_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_chosen: int | None = None


def parse_verbosity(value: str, source: str = VERBOSITY_ENV) -> int:
    """A verbosity name (case-insensitive) as a logging level, or a one-line ``ValueError``."""
    level = LEVELS.get(str(value).strip().lower())
    if level is None:
        raise ValueError(f"{source}={value!r} is not a verbosity; use one of {', '.join(LEVELS)}")
    return level


def set_verbosity(value: str | None) -> None:
    """Set the report threshold for this process (``None``: back to ``ENGINE_VERBOSITY`` / info)."""
    global _chosen
    _chosen = None if value is None else parse_verbosity(value, "verbosity")


def threshold() -> int:
    if _chosen is not None:
        return _chosen
    return parse_verbosity(os.environ.get(VERBOSITY_ENV, "info"))


def _handled(log: logging.Logger) -> bool:
    """Whether a record from ``log`` reaches a handler the application set up (NullHandler does not count)."""
    current: logging.Logger | None = log
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def emit(level: int, message: str) -> None:
    """Log ``message``; without an application handler, write it to stderr (at or above the threshold)."""
    if level < threshold():
        return
    if _handled(logger):
        logger.log(level, message)
    else:
        print(message, file=sys.stderr)


def warn(message: str) -> None:
    emit(logging.WARNING, "engine: " + message)
