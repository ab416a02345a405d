"""The peak-memory sampler of ``fedbicross simulate`` (runners/resources.py), on real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedbicross_flwr.runners.resources import PeakMemory, program_name, role_of

HOLD = "import sys, time; x = b'\\x01' * ({mib} * 2**20); print('ready', flush=True); " \
       "time.sleep(60)"


def test_the_sampler_finds_each_process_of_the_run_and_its_peak(tmp_path) -> None:
    # Prepare: two processes of this FLWR_HOME holding 120 and 60 MiB they wrote, one outside it
    home = tmp_path / "home"
    env = {"FLWR_HOME": str(home), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", HOLD.format(mib=mib)], env=env,
                              stdout=subprocess.PIPE, text=True) for mib in (120, 60)]
    outside = subprocess.Popen([sys.executable, "-c", HOLD.format(mib=200)],
                               env={**env, "FLWR_HOME": str(tmp_path / "other")},
                               stdout=subprocess.PIPE, text=True)
    try:
        for proc in [*procs, outside]:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # Execute
        with PeakMemory(home, interval=0.1) as memory:
            time.sleep(0.5)
        report = memory.report()
    finally:
        for proc in [*procs, outside]:
            proc.kill()
            proc.wait()
    # Assert: both processes, as role "other"; the largest one's RSS; the sum of their PSS
    (role,) = report["roles"]
    assert role == "other" and report["roles"]["other"]["processes"] == 2
    other = report["roles"]["other"]
    assert 120 <= other["peak-process-mib"] < 200  # not the 200 MiB process outside the run
    assert 180 <= other["peak-sum-mib"] < 380 and report["peak-total-mib"] == other["peak-sum-mib"]
    assert report["samples"] >= 3 and other["names"] == ["python -c"]


@pytest.mark.parametrize(("cmdline", "role"), [
    ("ray::ClientAppActor.run", "ray-worker"),
    ("ray::IDLE", "ray-worker"),
    ("/venv/bin/python3.11 -u /venv/lib/python3.11/site-packages/ray/_private/workers/"
     "default_worker.py --node-ip-address=127.0.0.1 --raylet-name=/tmp/ray/raylet",
     "ray-worker"),
    ("ray::DashboardAgent", "ray-system"),
    ("ray::RuntimeEnvAgent", "ray-system"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py --x",
     "ray-system"),
    ("/venv/bin/python /venv/bin/flower-superexec --plugin-type serverapp", "superlink"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x",
     "ray-system"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=x",
     "ray-system"),
    ("/venv/bin/python /venv/bin/flwr-simulation --insecure --serverappio-api-address x",
     "server"),
    ("/venv/bin/python /venv/bin/flower-superlink --insecure", "superlink"),
    ("/venv/bin/python /venv/bin/flwr log 1 --stream", "flwr-cli"),
    ("/usr/bin/python3 something_else.py", "other"),
])
def test_processes_are_told_apart_by_their_command_line(cmdline: str, role: str) -> None:
    assert role_of(cmdline) == role


@pytest.mark.parametrize(("cmdline", "name"), [
    ("ray::ClientAppActor.run", "ray::ClientAppActor.run"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x=1", "raylet"),
    ("/venv/bin/python3.11 /venv/bin/flwr-simulation --insecure", "flwr-simulation"),
    ("/venv/bin/python -m fedbicross_flwr.deploy.superlink_gate --ssl",
     "python -m fedbicross_flwr.deploy.superlink_gate"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py --x",
     "dashboard.py"),
])
def test_program_names_are_short(cmdline: str, name: str) -> None:
    assert program_name(cmdline) == name
