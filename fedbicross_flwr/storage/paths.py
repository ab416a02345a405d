"""What a path is, when a regular file was expected: the words of an error line.

A path given as a file to read (a data archive, a preset) may be a folder, a FIFO or a device.
Reading a FIFO blocks until someone writes to it and ``/dev/zero`` never ends, so the kind of
a path is checked with ``stat`` before anything is opened, and the error names it.

This module imports nothing else from the package.
"""

from __future__ import annotations

import stat
from pathlib import Path


def not_a_file(path: Path, expected: str) -> str | None:
    """What is wrong with ``path`` as ``expected`` (e.g. "an npz file") to read, or None for
    a regular file: ``"not found"``, ``"cannot be opened: <reason>"`` or ``"is <kind>, not
    <expected>"`` (a folder, a FIFO (named pipe), a character device, ...).
    """
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as err:
        return f"cannot be opened: {err.strerror or err}"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device"
            if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"is {kind}, not {expected}"


__all__ = ["not_a_file"]
