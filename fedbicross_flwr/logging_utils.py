"""Logging: Flower's logger when Flower is installed, the standard library otherwise.

The lent GPU machine has no ``flwr``; the library must still import there, so every module
logs through :func:`log` from this file (same signature as ``flwr.common.logger.log``).
"""

from __future__ import annotations

import logging
from pathlib import Path

try:  # Flower present: share its logger, so `flwr run` shows our lines in the run log.
    from flwr.common.logger import FLOWER_LOGGER as LOGGER
except ImportError:  # pragma: no cover - exercised only on machines without flwr
    LOGGER = logging.getLogger("fedbicross")
    if not LOGGER.handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s | %(message)s"))
        LOGGER.addHandler(_handler)
        LOGGER.setLevel(logging.INFO)


def log(level: int, msg: str, *args: object) -> None:
    """Log ``msg % args`` at ``level`` (``logging.INFO``, ``logging.WARNING`` ...)."""
    LOGGER.log(level, msg, *args)


def add_file_handler(path: Path) -> logging.Handler:
    """Also write the log to ``path`` (the run folder's ``log.txt``); returns the handler."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s | %(message)s"))
    LOGGER.addHandler(handler)
    return handler


def remove_handler(handler: logging.Handler) -> None:
    """Detach and close a handler added by :func:`add_file_handler`."""
    LOGGER.removeHandler(handler)
    handler.close()
