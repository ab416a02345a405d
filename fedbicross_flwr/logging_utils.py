"""Logging: Flower's logger when Flower is installed, the standard library otherwise.

The lent GPU machine has no ``flwr``; the library must still import there, so every module
logs through :func:`log` from this file (same signature as ``flwr.common.logger.log``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

# A line of a run folder's log.txt (and of the terminal where Flower is absent).
LOG_FORMAT = "%(levelname)s %(asctime)s | %(message)s"

try:  # Flower present: share its logger, so `flwr run` shows our lines in the run log.
    from flwr.common.logger import FLOWER_LOGGER as LOGGER
except ImportError:  # pragma: no cover - exercised only on machines without flwr
    LOGGER = logging.getLogger("fedbicross")
    if not LOGGER.handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter(LOG_FORMAT))
        LOGGER.addHandler(_handler)
        LOGGER.setLevel(logging.INFO)


def log(level: int, msg: str, *args: object) -> None:
    """Log ``msg % args`` at ``level`` (``logging.INFO``, ``logging.WARNING`` ...)."""
    LOGGER.log(level, msg, *args)


def progress_text(done: int, total: int, elapsed_s: float) -> str:
    """``"40/200 (20%), 12.3 s, 3.3/s, ETA 49 s"``: steps done, rate and time left.

    The ETA assumes the remaining steps run at the mean rate so far.
    """
    rate = done / elapsed_s if elapsed_s > 0 else float("inf")
    left = (total - done) / rate if done and rate > 0 else float("nan")
    eta = "n/a" if left != left else (f"{left / 60:.1f} min" if left >= 120 else f"{left:.0f} s")
    return (f"{done}/{total} ({100 * done / max(total, 1):.0f}%), {elapsed_s:.1f} s, "
            f"{rate:.2f}/s, ETA {eta}")


# --- where the run is: "method j/m <name>", "stage i/n <name>" ---------------------------------
_POSITION: list[str] = []  # outermost first, e.g. ["method 3/3 fedbicross", "stage 2/6 ..."]


@contextmanager
def run_position(label: str) -> Iterator[None]:
    """Mark a part of the run (e.g. ``"method 2/3 fedavg1"``) for the progress lines inside it.

    On exit the label goes, with any inner label left behind (a stage ended by an exception).
    """
    depth = len(_POSITION)
    _POSITION.append(label)
    try:
        yield
    finally:
        del _POSITION[depth:]


def keeps_position(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: the position labels ``fn`` pushes (its stages) are gone when it returns or
    raises, so a failed run does not leave its stage in later log lines.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        depth = len(_POSITION)
        try:
            return fn(*args, **kwargs)
        finally:
            del _POSITION[depth:]

    return wrapper


def position_text() -> str:
    """``"[method 3/3 fedbicross | stage 2/6 Stage 1b synthesis, cluster 0] "``, or ``""``."""
    return f"[{' | '.join(_POSITION)}] " if _POSITION else ""


class StagePlan:
    """Numbered stages of a long computation: :meth:`begin` logs ``stage i of n`` and marks
    the progress lines until the next stage or :meth:`finish`.

    Parameters
    ----------
    names : Sequence[str]
        The stages in order (e.g. those of Algorithm 1); unique names.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.start = time.perf_counter()
        self.label: str | None = None

    def begin(self, name: str) -> None:
        """Enter stage ``name`` (leaving the previous one)."""
        self.finish()
        i = self.names.index(name) + 1
        log(logging.INFO, "%sstage %d of %d: %s (%.1f s since the first stage)",
            position_text(), i, len(self.names), name, time.perf_counter() - self.start)
        self.label = f"stage {i}/{len(self.names)} {name}"
        _POSITION.append(self.label)

    def finish(self) -> None:
        """Leave the current stage, if any."""
        if self.label is not None and self.label in _POSITION:
            _POSITION.remove(self.label)
        self.label = None


class Cadence:
    """When a loop of ``total`` steps should log: every ~``fraction`` of the steps, at the last
    step, and at least every ``seconds`` of wall time (slow steps on shared cores).
    """

    def __init__(self, total: int, fraction: float = 0.1, seconds: float = 30.0) -> None:
        self.total, self.every, self.seconds = total, max(1, int(total * fraction)), seconds
        self.last = time.perf_counter()

    def due(self, done: int) -> bool:
        """True (and the clock restarts) when step ``done`` should be logged."""
        now = time.perf_counter()
        if done % self.every == 0 or done == self.total or now - self.last >= self.seconds:
            self.last = now
            return True
        return False

