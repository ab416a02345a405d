"""Run the app as a real ``flwr run`` simulation (SuperLink + Ray), and clean up after it.

``flwr run`` starts a detached local SuperLink on first use, returns at once, and exits 0 even
when the run fails. This module wraps it for people and for CI: it isolates ``FLWR_HOME``,
turns off the runtime dependency installation (which would try to download torch), streams
the log, waits for the run's final status, and stops every process that carries its
``FLWR_HOME`` (SuperLink, SuperExec, Ray) by PID, also when something goes wrong.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.reports.results import default_output_dir
from fedbicross_flwr.runners.resources import PeakMemory, processes_of
from fedbicross_flwr.storage.atomic import write_text


@dataclass
class SimulationResult:
    """Outcome of one ``flwr run``."""

    run_id: str
    status: str  # e.g. "finished:completed", "finished:failed"
    details: str
    run_dir: Path | None  # the run folder the ServerApp wrote
    wait_cpu_s: float = 0.0  # CPU seconds spent waiting: this process, `flwr log`, status calls
    machine_cpu_s: float = 0.0  # CPU seconds of the whole machine over the same interval
    memory: dict[str, Any] | None = None  # peak memory per role (runners/resources.py)

    @property
    def wait_share(self) -> float:
        """Waiting's share of the machine's CPU time while the run ran (0 if unknown)."""
        return self.wait_cpu_s / self.machine_cpu_s if self.machine_cpu_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Whether the run finished and completed."""
        return self.status == "finished:completed"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_superlink_ports(flwr_home: Path) -> dict[str, str]:
    """Free ports for this FLWR_HOME's auto-started local SuperLink, chosen once and kept.

    ``flwr run`` starts its local SuperLink on fixed default ports (39091/39093); a second
    simulation on the same machine (another user, another test) would then talk to the FIRST
    SuperLink and its FLWR_HOME. Flower reads the ports from these environment variables.
    """
    path = flwr_home / "local-superlink-ports.json"
    if path.is_file():
        return json.loads(path.read_text())
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
             "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    while ports["FLWR_LOCAL_CONTROL_API_PORT"] == ports["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]:
        ports["FLWR_LOCAL_CONTROL_API_PORT"] = str(_free_port())
    flwr_home.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(ports))
    return ports


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for an offline, isolated Flower (with its own local SuperLink ports)."""
    env = dict(os.environ)
    env.update(local_superlink_ports(flwr_home))
    # `flwr run` launches `flower-superlink` from PATH: use this interpreter's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    return env


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores (Linux ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _flwr_bin() -> str:
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


def stop_processes(flwr_home: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every process of this FLWR_HOME."""
    pids = processes_of(flwr_home)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and processes_of(flwr_home):
        time.sleep(0.2)
    for pid in processes_of(flwr_home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def run_status(run_id: str, flwr_home: Path) -> tuple[str, str]:
    """(status, details) of a run, from ``flwr list --run-id``."""
    out = subprocess.run([_flwr_bin(), "list", "--run-id", run_id, "--format", "json"],
                         capture_output=True, text=True, env=flwr_env(flwr_home), timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return "unknown", out.stdout + out.stderr
    return runs[0]["status"], runs[0].get("status-details", "")


def wait_for_final_status(run_id: str, flwr_home: Path, log_proc: subprocess.Popen,
                          deadline: float, check_every: float = 120.0,
                          backoff: tuple[float, float] = (5.0, 60.0)) -> tuple[str, str]:
    """Wait, spending almost no CPU, until the run has a final status or ``deadline`` passes.

    The run's ``flwr log --stream`` process (``log_proc``) exits when the run ends; until
    then the status is read only every ``check_every`` seconds (a run whose log stream stays
    open after it finished is still noticed). If the log stream ends before the run does
    (the SuperLink dropped it), the status is polled with a backoff from ``backoff[0]`` to
    ``backoff[1]`` seconds.

    Returns
    -------
    tuple[str, str]
        (status, details) from ``flwr list``, or ``("timeout", "")``.
    """
    delay = backoff[0]
    while (left := deadline - time.monotonic()) > 0:
        if log_proc.poll() is None:
            try:
                log_proc.wait(timeout=min(check_every, left))
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(min(delay, left))
            delay = min(2 * delay, backoff[1])
        status, details = run_status(run_id, flwr_home)
        if status.startswith("finished"):
            return status, details
    return "timeout", ""


def _end_log_stream(log_proc: subprocess.Popen) -> None:
    """Let ``flwr log`` print its last lines, then end and reap it (its CPU is then counted)."""
    if log_proc.poll() is None:
        time.sleep(1.0)
        log_proc.terminate()
    try:
        log_proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log_proc.kill()
        log_proc.wait()


def simulate(project_dir: Path, run_config: dict[str, Any], num_supernodes: int,
             flwr_home: Path | None = None, timeout: float = 3600.0, stream: bool = True,
             cpus_per_client: int = 1) -> SimulationResult:
    """``flwr run`` the app with ``run_config`` overrides and wait for the final status.

    The run folder is ``<output-dir>/<run-name>`` (with ``methods``: the comparison folder
    ``<run-name>-comparison``, or ``<run-name>-<method>`` for one method); a ``run-name`` is set if missing so it can be found afterwards. All processes started under ``flwr_home`` are stopped at the end.
    """
    owns_home = flwr_home is None
    flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="fedbicross-flwr-home-")).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    run_config = dict(run_config)
    run_config.setdefault("run-name", f"{time.strftime('%Y%m%d-%H%M%S')}-flwr")
    run_config.setdefault("num-clients", num_supernodes)
    cfg = RunConfig.from_run_config(run_config)  # fail here, not inside the SuperLink
    env = flwr_env(flwr_home)
    overrides = flwr_home / "run-config.toml"
    import tomli_w

    write_text(overrides, tomli_w.dumps(run_config))
    log_proc = None
    memory = PeakMemory(flwr_home).start()
    try:
        out = subprocess.run(
            [_flwr_bin(), "run", str(project_dir), "--run-config", str(overrides),
             "--federation-config",
             f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
             "--format", "json"],
            capture_output=True, text=True, env=env, timeout=300)
        try:
            run_id = str(json.loads(out.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError) as err:
            raise RuntimeError(f"flwr run did not start a run:\n{out.stdout}\n{out.stderr}") \
                from err
        # `flwr log --stream` ends when the SuperLink closes the run's log stream, i.e. when
        # the run ends: waiting on that one process costs no CPU, where polling `flwr list`
        # costs about 1.6 s of CPU per call (a new process importing Flower; README).
        cpu_at_start = (own_cpu_seconds(), machine_cpu_seconds())
        log_proc = subprocess.Popen([_flwr_bin(), "log", run_id, "--stream"], env=env,
                                    stdout=None if stream else subprocess.DEVNULL,
                                    stderr=None if stream else subprocess.DEVNULL)
        status, details = wait_for_final_status(run_id, flwr_home, log_proc,
                                                time.monotonic() + timeout)
        if status == "timeout":
            subprocess.run([_flwr_bin(), "stop", run_id], env=env, capture_output=True,
                           timeout=60)
            details = f"no final status after {timeout}s"
        base = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
        methods = cfg.method_list if cfg.methods else []
        run_dir = base / (cfg.run_name if not methods else f"{cfg.run_name}-{methods[0]}"
                          if len(methods) == 1 else f"{cfg.run_name}-comparison")
        _end_log_stream(log_proc)
        log_proc = None
        memory.stop()
        return SimulationResult(run_id, status, details, run_dir if run_dir.is_dir() else None,
                                wait_cpu_s=own_cpu_seconds() - cpu_at_start[0],
                                machine_cpu_s=machine_cpu_seconds() - cpu_at_start[1],
                                memory=memory.report())
    finally:
        memory.stop()
        if log_proc is not None:
            _end_log_stream(log_proc)
        stop_processes(flwr_home)
        if owns_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
