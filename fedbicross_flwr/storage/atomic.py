"""Files written whole or not at all: a temporary file beside the target, then ``os.replace``.

A crash or a full disk while a file is written must leave the earlier file, or none, never a
part of one: a ``summary.json`` cut to 0 bytes would lose a finished run's result. Here the
bytes go to ``<name>.tmp`` in the same folder, which is flushed to disk and then replaces
``<name>`` in one step (``os.replace`` is atomic within a file system); on any error the
temporary file is removed. Every file a run, a comparison or a grid writes as a result goes
through here (the run folder's JSON, CSV and Markdown files and its figures), and so do the
checkpoints (:mod:`.checkpoint_io`).

This module imports nothing else from the package.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO


class WriteError(RuntimeError):
    """A file could not be written (a full disk, a read-only folder); nothing partial is left."""


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it replaces the real name: ``<name>.tmp`` beside it."""
    return path.with_name(path.name + ".tmp")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield the temporary path to write; when the block ends without an error, the file is
    flushed to disk and replaces ``path``; on any error it is removed and ``path`` is left as
    it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_problem(path: Path, err: BaseException) -> str:
    """``cannot write <name> in <folder>: <reason>``, on one line."""
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return f"cannot write {path.name} in {path.parent}: {reason}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """:func:`replacing`, with a failed write (an ``OSError``) raised as :class:`WriteError`
    naming the file and what is left of it.
    """
    path = Path(path)
    try:
        with replacing(path) as tmp:
            yield tmp
    except OSError as err:
        kept = (f"the earlier {path.name} is kept" if path.exists()
                else f"no {path.name} was written")
        raise WriteError(f"{write_problem(path, err)}; the partial file is removed and "
                         f"{kept}") from err


@contextmanager
def open_text(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """An open text file whose content replaces ``path`` when the block ends (``csv`` writers:
    ``newline=""``).

    Raises
    ------
    WriteError
        The file cannot be written; ``path`` is left as it was.
    """
    with atomic_path(path) as tmp, tmp.open("w", newline=newline) as fh:
        yield fh


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all; returns ``path``.

    Raises
    ------
    WriteError
        The file cannot be written; ``path`` is left as it was.
    """
    with open_text(path) as fh:
        fh.write(text)
    return Path(path)


def save_figure(fig: Any, path: Path, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)`` whole or not at all (the format from ``path``'s suffix).

    Raises
    ------
    WriteError
        The file cannot be written; ``path`` is left as it was.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **kwargs)
    return path


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (reported as missing, not as a number); arrays and
    tensors become lists.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return value


def write_json(path: Path, payload: Any) -> Path:
    """Pretty JSON, NaN written as null (:func:`json_safe`); whole or not at all
    (:func:`write_text`).
    """
    return write_text(path, json.dumps(json_safe(payload), indent=2, sort_keys=False) + "\n")


__all__ = ["WriteError", "atomic_path", "json_safe", "open_text", "replacing", "save_figure",
           "temporary_path", "write_json", "write_problem", "write_text"]
