"""The ``engine`` logger prints patch reports to stderr by default; ``ENGINE_VERBOSITY`` sets its level."""

from __future__ import annotations

import logging
import os
import sys


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (so redirection and capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_default_logger() -> logging.Logger:
    logger = logging.getLogger("engine")
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(os.environ.get("ENGINE_VERBOSITY", "INFO").upper())
    return logger
