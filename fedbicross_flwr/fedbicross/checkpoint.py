"""Resumable server stages: checkpoints of FedBiCross's Stages 1-2 in a folder.

The server stage is where the hours go (trajectory synthesis and bi-level KD), so it is saved
at three points and a rerun continues from the last one instead of starting over:

``clustering.pt``               after Stage 1a (noise predictions, assignment, centroids)
``epoch<e>-cluster<k>.pt``      after cluster k's synthesis in server epoch e: the trajectory,
                                its labels, diagnostics and the frozen teachers' soft labels
                                (so neither synthesis nor noise adaptation is redone)
``epoch<e>-bilevel.pt``         after server epoch e's bi-level stage: the cluster models, the
                                cross-cluster weights, the momentum buffers and the histories;
                                the epoch's synthesis checkpoints are deleted then (not needed)

Every file is written atomically (temporary file + rename) so a crash during a save never
leaves a half-written checkpoint, and ``manifest.json`` records a fingerprint of what the
checkpoints belong to (settings, client models, shapes) plus each file's sha256. A checkpoint
made for other inputs raises :class:`CheckpointMismatch` instead of being used silently.

A checkpoint that is refused is named with the reason in one warning line, renamed to
``<name>.pt.bad`` in the same folder (:func:`~fedbicross_flwr.storage.checkpoint_io.set_aside`;
an earlier ``.bad`` of that name is replaced) and dropped from the manifest, and its stage is
recomputed as if it had never been saved: a file that is corrupt or altered (checksum
mismatch), that is not plain tensor data (files are read with
``torch.load(weights_only=True)``, see :mod:`fedbicross_flwr.storage.checkpoint_io`), that
holds NaN/Inf, or whose content is not what this run would have computed (keys, types,
shapes, dtypes, index ranges, a usable model: :mod:`.checkpoint_checks`). A malformed
``manifest.json`` (not JSON, not a dict, files that are not a mapping of plain names to
sha256 digests) is set aside the same way, as ``manifest.json.bad``, and the folder is then
treated as holding no checkpoints.
Every stage is seeded from the settings (no global RNG state), which is why a resumed run gives
the same numbers as an uninterrupted one on CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..logging_utils import log
from ..storage.atomic import write_text
from ..storage.checkpoint_io import (
    CheckpointRefused,
    load_plain,
    non_finite,
    save_plain,
    set_aside,
)
from ..storage.payload_checks import PayloadError
from .checkpoint_checks import check_manifest

MANIFEST = "manifest.json"


class CheckpointMismatch(RuntimeError):
    """The checkpoint folder belongs to another configuration or other client models."""


def fingerprint(settings: dict[str, Any], client_models: Sequence[nn.Module],
                extra: dict[str, Any]) -> str:
    """sha256 over the settings, the extra inputs and every client tensor (bit-exact).

    Parameters
    ----------
    settings : dict
        The algorithm settings (JSON-serialisable), e.g. ``dataclasses.asdict(settings)``.
    client_models : Sequence[nn.Module]
        The uploaded models f_i, in client order.
    extra : dict
        Other inputs that change the result (channels, classes, image size, client weights).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"settings": settings, "extra": extra}, sort_keys=True,
                             default=str).encode())
    for model in client_models:
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            flat = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d buffers too
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


class StageCheckpoints:
    """A folder of named stage checkpoints that belong to one fingerprint.

    Parameters
    ----------
    directory : Path or None
        Where to keep them; None disables checkpointing (every method is then a no-op).
    fingerprint : str
        What the checkpoints belong to (see :func:`fingerprint`).
    """

    def __init__(self, directory: Path | None, fingerprint: str) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.files: dict[str, str] = {}  # checkpoint name -> sha256
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files = self._read_manifest()
        if self.files:
            log(INFO, "resuming from checkpoints in %s: %s", self.directory, sorted(self.files))
        self._write_manifest()

    def _read_manifest(self) -> dict[str, str]:
        """The recorded checkpoints (name -> sha256): none when there is no manifest, or when
        it is malformed (then it is set aside, with one warning line).

        Raises
        ------
        CheckpointMismatch
            A well-formed manifest of another fingerprint.
        """
        assert self.directory is not None
        manifest = self.directory / MANIFEST
        if not (manifest.exists() or manifest.is_symlink()):
            return {}
        try:
            if not manifest.is_file():  # a folder, a FIFO, a device: never read
                raise OSError("it is not a regular file")
            found, files = check_manifest(json.loads(manifest.read_bytes()))
        except (OSError, ValueError, RecursionError) as err:  # unreadable, not JSON, malformed
            aside = set_aside(manifest)
            log(WARNING, "checkpoint manifest %s is refused: %s; set aside as %s, the stages "
                "are recomputed", manifest, " ".join(str(err).split())[:300], aside.name)
            return {}
        if found != self.fingerprint:
            raise CheckpointMismatch(
                f"the checkpoints in {self.directory} were made with other settings or other "
                "client models; use another run name, or remove that folder to start over")
        return files

    @property
    def enabled(self) -> bool:
        """Whether checkpoints are kept (a directory was given)."""
        return self.directory is not None

    def _write_manifest(self) -> None:
        assert self.directory is not None
        write_text(self.directory / MANIFEST, json.dumps(
            {"fingerprint": self.fingerprint, "files": self.files}, indent=1, sort_keys=True))

    def has(self, name: str) -> bool:
        """Whether the checkpoint ``name`` was saved (and is in the manifest)."""
        return self.enabled and name in self.files

    def load(self, name: str, check: Callable[[Any], None] | None = None) -> Any | None:
        """The payload saved under ``name``, or None: absent, or refused. A file is refused
        when its sha256 differs from the manifest's, when it holds anything but tensors and
        plain containers (it is read with ``torch.load(weights_only=True)``, so a pickled
        object never runs), when a tensor in it holds NaN/Inf, or when ``check(payload)``
        raises :class:`~fedbicross_flwr.storage.payload_checks.PayloadError` (content this run
        would not have computed). A refused file is named in one warning line, set aside as
        ``<name>.pt.bad`` and dropped from the manifest; the caller recomputes the stage.
        """
        if not self.has(name):
            return None
        assert self.directory is not None
        path = self.directory / f"{name}.pt"
        try:
            payload = load_plain(path, self.files[name])
            if (where := non_finite(payload)) is not None:
                raise CheckpointRefused(f"checkpoint {path} holds NaN/Inf values in {where}")
            if check is not None:
                check(payload)
        except (CheckpointRefused, PayloadError) as err:
            self._refuse(name, path, err)
            return None
        return payload

    def _refuse(self, name: str, path: Path, err: Exception) -> None:
        """One warning line naming the file and the problem; the file set aside, the entry
        dropped from the manifest.
        """
        reason = str(err) if isinstance(err, CheckpointRefused) else (
            f"checkpoint {path} does not hold what this run computes: {err}")
        aside = set_aside(path) if path.exists() or path.is_symlink() else None
        self.files.pop(name, None)
        self._write_manifest()
        log(WARNING, "%s; %srecomputing that stage", " ".join(reason.split())[:500],
            f"set aside as {aside.name}, " if aside is not None else "")

    def save(self, name: str, payload: Any) -> None:
        """Write ``payload`` (tensors, numpy arrays, plain containers) atomically and record
        its sha256 in the manifest.
        """
        if not self.enabled:
            return
        assert self.directory is not None
        path = self.directory / f"{name}.pt"
        self.files[name] = save_plain(payload, path)
        self._write_manifest()
        log(INFO, "checkpoint saved: %s", path)

    def drop(self, names: Sequence[str]) -> None:
        """Delete checkpoints that a later one makes unnecessary (frees disk)."""
        if not self.enabled:
            return
        assert self.directory is not None
        for name in names:
            self.files.pop(name, None)
        self._write_manifest()
        for name in names:
            (self.directory / f"{name}.pt").unlink(missing_ok=True)
