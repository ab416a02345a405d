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


def progress_text(done: int, total: int, elapsed_s: float) -> str:
    """``"40/200 (20%), 12.3 s, 3.3/s, ETA 49 s"``: steps done, rate and time left.

    The ETA assumes the remaining steps run at the mean rate so far.
    """
    rate = done / elapsed_s if elapsed_s > 0 else float("inf")
    left = (total - done) / rate if done and rate > 0 else float("nan")
    eta = "n/a" if left != left else (f"{left / 60:.1f} min" if left >= 120 else f"{left:.0f} s")
    return (f"{done}/{total} ({100 * done / max(total, 1):.0f}%), {elapsed_s:.1f} s, "
            f"{rate:.2f}/s, ETA {eta}")
