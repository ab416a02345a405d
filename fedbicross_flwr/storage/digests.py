"""Hex digests of files, read in 1 MiB chunks (torch-free: the datasets use it too)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes with a :mod:`hashlib` algorithm (e.g. "sha256", "md5")."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
