"""Peak memory of a ``flwr run`` simulation, per role (server, Ray workers, SuperLink, ...).

Every process of the run carries its ``FLWR_HOME`` (see :func:`processes_of`). A background
thread reads each one's ``/proc/<pid>/smaps_rollup`` every ``interval`` seconds and keeps, per
role:

* ``peak-process-mib``: the largest resident set (RSS) one process of that role reached;
* ``peak-sum-mib``: the largest sum over the role's processes of their proportional set size
  (PSS: a page shared by n processes counts 1/n in each, so sums do not count the shared
  libraries and Ray's shared object store twice);
* ``processes``: how many distinct processes of that role were seen;
* ``names``: their program names (the ``ray::`` task of a Ray worker).

``peak-total-mib`` is the largest PSS sum over all roles at one sample: what the run needed
from the machine. Memory that lives less than one interval can be missed.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (role, what its command line holds), first match wins. A Ray worker's argv[0] is its task
# (``ray::ClientAppActor``, ``ray::IDLE``; ``default_worker.py`` before it has one); Ray's own
# agents are ``ray::`` processes too.
ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ray-system", ("ray::DashboardAgent", "ray::RuntimeEnvAgent")),
    ("ray-worker", ("ray::", "default_worker.py", "setup_worker.py")),
    ("ray-system", ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env",
                    "monitor.py")),
    ("server", ("flwr-simulation", "flower-simulation", "flwr-serverapp")),
    ("superlink", ("flower-superlink", "superlink", "flower-superexec")),
    ("flwr-cli", ("bin/flwr",)),
)


def processes_of(flwr_home: Path) -> list[int]:
    """PIDs of the processes whose environment has this FLWR_HOME (Linux /proc)."""
    marker = _home_marker(flwr_home)
    return sorted(pid for pid in _other_pids() if _has_marker(pid, marker))


def _home_marker(flwr_home: Path) -> bytes:
    return f"FLWR_HOME={flwr_home}".encode()


def _other_pids() -> set[int]:
    """Every process of the machine but this one."""
    pids = {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}
    pids.discard(os.getpid())
    return pids


def _has_marker(pid: int, marker: bytes) -> bool | None:
    """Whether the environment of ``pid`` holds ``marker``; None if it cannot be read."""
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None


def role_of(cmdline: str) -> str:
    """The role of a process of the run, from its command line (arguments joined by spaces)."""
    for role, marks in ROLES:
        if any(mark in cmdline for mark in marks):
            return role
    return "other"


def program_name(cmdline: str) -> str:
    """``raylet`` for ``/venv/.../raylet --x``, ``flwr-simulation`` for ``python .../flwr-simulation``,
    ``ray::ClientAppActor`` for a Ray worker.
    """
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    first = Path(words[0]).name
    if not first.startswith("python"):
        return first
    if "-c" in words[1:2]:
        return "python -c"
    rest = [w for w in words[1:] if w == "-m" or not w.startswith("-")]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return f"python -m {rest[1]}"
    return Path(rest[0]).name if rest else first


def read_memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of a process in KiB, or None if it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0])
    return (values["Rss"], values["Pss"]) if len(values) == 2 else None


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return None


@dataclass
class PeakMemory:
    """Samples the memory of every process of ``flwr_home`` until :meth:`stop`.

    Use as a context manager around the run; :meth:`report` gives the peaks.
    """

    flwr_home: Path
    interval: float = 5.0  # seconds; a read costs about 3.5 ms of CPU per GB of the run
    _peak_process: dict[str, int] = field(default_factory=dict)  # role -> KiB (RSS)
    _peak_sum: dict[str, int] = field(default_factory=dict)  # role -> KiB (PSS sum)
    _seen: dict[str, set[int]] = field(default_factory=dict)  # role -> pids
    _names: dict[str, set[str]] = field(default_factory=dict)  # role -> program names
    _ours: set[int] = field(default_factory=set)  # PIDs of the run
    _foreign: set[int] = field(default_factory=set)  # PIDs of other processes
    _peak_total: int = 0
    _samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        return self.start()

    def start(self) -> PeakMemory:
        """Start sampling in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Take a last sample and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        """One reading of every process of the run."""
        sums: dict[str, int] = {}
        for pid in self._run_pids():
            cmd, mem = _cmdline(pid), read_memory_kib(pid)
            if cmd is None or mem is None:
                continue
            role = role_of(cmd)
            self._seen.setdefault(role, set()).add(pid)
            self._names.setdefault(role, set()).add(program_name(cmd))
            self._peak_process[role] = max(self._peak_process.get(role, 0), mem[0])
            sums[role] = sums.get(role, 0) + mem[1]
        for role, kib in sums.items():
            self._peak_sum[role] = max(self._peak_sum.get(role, 0), kib)
        self._peak_total = max(self._peak_total, sum(sums.values()))
        self._samples += 1

    def _run_pids(self) -> list[int]:
        """:func:`processes_of`, reading each new PID's environment only once."""
        marker, alive = _home_marker(self.flwr_home), _other_pids()
        for pid in alive - self._ours - self._foreign:
            if (ours := _has_marker(pid, marker)) is not None:
                (self._ours if ours else self._foreign).add(pid)
        self._ours &= alive
        self._foreign &= alive
        return sorted(self._ours)

    def report(self) -> dict[str, Any]:
        """The peaks in MiB, per role and in all (JSON-ready)."""
        return {
            "interval-s": self.interval, "samples": self._samples,
            "peak-total-mib": round(self._peak_total / 1024, 1),
            "roles": {role: {"peak-process-mib": round(self._peak_process[role] / 1024, 1),
                             "peak-sum-mib": round(self._peak_sum.get(role, 0) / 1024, 1),
                             "processes": len(self._seen[role]),
                             "names": sorted(self._names[role])}
                      for role in sorted(self._seen)},
        }

