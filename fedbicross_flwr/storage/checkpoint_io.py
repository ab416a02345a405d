"""Checkpoint files that are data, not code: plain containers, sha256-checked, loaded with
``torch.load(weights_only=True)``.

A checkpoint written by one run is read back by a later one, maybe after the run folder sat on
a shared disk. ``torch.load`` with ``weights_only=False`` runs whatever a pickle contains, so a
tampered file could execute code on the server. Here every payload is converted to tensors and
plain containers (dict, list, tuple, str, int, float, bool, None) before saving, numpy arrays
travel as tensors and are restored on loading, every file's sha256 is recorded when it is
written and checked before it is read, and loading refuses anything but weights.

It imports nothing else from the package but :mod:`.atomic`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbicross_flwr.storage.atomic import WriteError, replacing, write_problem, write_text
from fedbicross_flwr.storage.digests import file_digest

_NUMPY = "__numpy__"  # a numpy array saved as {_NUMPY: tensor}


class CheckpointRefused(RuntimeError):
    """A checkpoint file that is missing, altered, not plain data, or holds bad values."""


class CheckpointWriteError(WriteError):
    """A checkpoint file could not be written (a full disk, a read-only folder)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (the checksum every checkpoint record holds)."""
    return file_digest(path, "sha256")


def to_plain(payload: Any) -> Any:
    """``payload`` with numpy arrays as tagged tensors and numpy scalars as Python numbers.

    Raises
    ------
    TypeError
        For anything else that ``weights_only`` loading would refuse (objects, dataclasses).
    """
    if isinstance(payload, torch.Tensor) or payload is None or isinstance(
            payload, (str, bool, int, float)):
        return payload
    if isinstance(payload, np.ndarray):
        if payload.dtype == object:
            raise TypeError("a numpy object array cannot be checkpointed")
        return {_NUMPY: torch.from_numpy(np.ascontiguousarray(payload).copy())}
    if isinstance(payload, np.generic):
        return payload.item()
    if isinstance(payload, dict):
        return {k: to_plain(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return type(payload)(to_plain(v) for v in payload)
    raise TypeError(f"cannot checkpoint a {type(payload).__name__} (plain data only)")


def from_plain(payload: Any) -> Any:
    """The inverse of :func:`to_plain`."""
    if isinstance(payload, dict):
        if set(payload) == {_NUMPY} and isinstance(payload[_NUMPY], torch.Tensor):
            return payload[_NUMPY].numpy()
        return {k: from_plain(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return type(payload)(from_plain(v) for v in payload)
    return payload


def save_plain(payload: Any, path: Path) -> str:
    """Write ``to_plain(payload)`` whole or not at all (:func:`~.atomic.replacing`); returns
    its sha256.
    """
    path = Path(path)
    plain = to_plain(payload)
    try:
        with replacing(path) as tmp:
            torch.save(plain, tmp)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        raise CheckpointWriteError(
            f"{write_problem(path, err)} (it needs about {tensor_bytes(plain) / 2**20:.0f} MiB, {free / 2**20:.0f} MiB "
            "are free there); the partial file is removed and the earlier checkpoints are "
            "kept: free space, then rerun with resume=true") from err
    return sha256_file(path)


def tensor_bytes(payload: Any) -> int:
    """Bytes of all tensors in a plain payload (about the size of its file)."""
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(tensor_bytes(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(tensor_bytes(v) for v in payload)
    return 0


def save_with_sidecar(payload: Any, path: Path, sidecar: Path) -> str:
    """:func:`save_plain`, then the sha256 as one line of text in ``sidecar``; returns it."""
    digest = save_plain(payload, path)
    write_text(Path(sidecar), digest + "\n")
    return digest


def load_with_sidecar(path: Path, sidecar: Path) -> Any:
    """:func:`load_plain` with the sha256 recorded in ``sidecar`` (refused if it is missing)."""
    sidecar = Path(sidecar)
    recorded = (sidecar.read_bytes()[:1000].decode("ascii", "replace").strip()
                if sidecar.is_file() else None)
    return load_plain(path, recorded)


def load_plain(path: Path, sha256: str | None) -> Any:
    """Read a file written by :func:`save_plain`, refusing anything but the data it wrote.

    Parameters
    ----------
    path : Path
        The checkpoint file.
    sha256 : str or None
        Its recorded checksum; None means none was recorded, which is refused too.

    Raises
    ------
    CheckpointRefused
        The file is missing, has no recorded checksum or another one (altered or corrupt),
        or holds more than tensors and plain containers (e.g. a pickled object, which is
        never run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointRefused(f"checkpoint {path} is missing")
    if sha256 is None:
        raise CheckpointRefused(f"checkpoint {path} has no recorded sha256")
    actual = sha256_file(path)
    if actual != sha256:
        raise CheckpointRefused(f"checkpoint {path} was altered or is corrupt (sha256 "
                                f"{actual[:12]}..., recorded {sha256[:12]}...)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a crafted file can make the unpickler raise anything
        raise CheckpointRefused(f"checkpoint {path} is not plain tensor data and was not "
                                f"loaded (torch.load weights_only=True: {_why(err)})") from err
    try:
        return from_plain(payload)
    except (TypeError, RuntimeError) as err:  # a tagged array numpy cannot hold (bfloat16)
        raise CheckpointRefused(f"checkpoint {path} holds an array that is not plain numpy "
                                f"data ({_why(err)})") from err


def set_aside(path: Path) -> Path:
    """Rename a refused checkpoint file (or folder) to ``<name>.bad`` beside it, replacing an
    earlier one of that name, so that it is kept for a look but never read again; returns the
    new path.
    """
    path = Path(path)
    aside = path.with_name(path.name + ".bad")
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    elif aside.exists() or aside.is_symlink():
        aside.unlink()
    path.rename(aside)
    return aside


def _why(err: Exception) -> str:
    """The line of a torch.load error that names the problem (e.g. the refused global)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: [^\n]*?(?= was not|$)", text, re.MULTILINE)
    if found:
        return found.group(0)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def discard_checkpoints(folder: Path) -> None:
    """Delete a finished run's checkpoint folder, except what was set aside as ``*.bad``
    (:func:`set_aside`): those files stay there, for a look at what was refused.
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return
    kept = False
    for entry in folder.iterdir():
        if entry.name.endswith(".bad"):
            kept = True
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)


def non_finite(payload: Any, where: str = "") -> str | None:
    """The first floating-point tensor or array in ``payload`` holding NaN/Inf, or None."""
    if isinstance(payload, torch.Tensor):
        if payload.is_floating_point() and not bool(torch.isfinite(payload).all()):
            return where or "the payload"
        return None
    if isinstance(payload, np.ndarray):
        if np.issubdtype(payload.dtype, np.floating) and not np.isfinite(payload).all():
            return where or "the payload"
        return None
    items = (payload.items() if isinstance(payload, dict)
             else enumerate(payload) if isinstance(payload, (list, tuple)) else ())
    for key, value in items:
        if (found := non_finite(value, f"{where}[{key!r}]")) is not None:
            return found
    return None
