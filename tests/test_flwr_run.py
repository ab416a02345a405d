"""A REAL `flwr run` simulation (SuperLink + Ray, 3 clients, three methods) on a tiny archive."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedbicross_flwr.runners.simulation import processes_of, simulate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.flwr_run
def test_flwr_run_simulation_completes_and_writes_results(tiny_run_config, tmp_path) -> None:
    # Prepare: an isolated FLWR_HOME; the tiny config with three methods in one run (as the
    # README's main command), FedBiCross at 3 synthesis steps, progress lines on
    flwr_home = tmp_path / "flwr-home"
    run_config = {**tiny_run_config, "run-name": "flwr-e2e", "node-wait-timeout": 60.0,
                  "methods": "local,fedavg1,fedbicross", "synth-steps": 3, "synth-batch": 6,
                  "noise-samples": 8, "num-clusters": 2, "kmeans-n-init": 1, "progress": True}
    try:
        # Execute
        result = simulate(ROOT, run_config, num_supernodes=3, flwr_home=flwr_home,
                          timeout=900, stream=False)
        # Assert: the run really completed (flwr run itself exits 0 on failure)
        assert result.ok, f"flwr run failed: {result.status} {result.details}"
        runs = Path(run_config["output-dir"])
        assert result.run_dir == runs / "flwr-e2e-comparison"
        local_acc = {}
        for method in ("local", "fedavg1", "fedbicross"):
            summary = json.loads((runs / f"flwr-e2e-{method}" / "summary.json").read_text())
            assert summary["num-completed"] == 3 and summary["acc-after-mean"] is not None
            with (runs / f"flwr-e2e-{method}" / "clients.csv").open() as fh:
                rows = list(csv.DictReader(fh))
            assert sorted(int(r["partition-id"]) for r in rows) == [0, 1, 2]
            local_acc[method] = [r["local-test-acc"] for r in rows]
        # phase 1 ran once: every method got the same client models
        assert local_acc["local"] == local_acc["fedavg1"] == local_acc["fedbicross"]
        table = (result.run_dir / "comparison.md").read_text()
        assert all(f"| {m} | 3/3 |" in table for m in ("local", "fedavg1", "fedbicross"))
        assert (result.run_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"
        # the server log shows the run's position and each long stage's ETA
        log = (runs / "flwr-e2e-fedbicross" / "log.txt").read_text()
        assert "[method 3/3 fedbicross | phase 2/3 fedbicross] stage 6 of 6: Stage 2" in log
        assert "stage 2/6 Stage 1b synthesis, cluster 0] epoch 1/1 cluster 0: synthesis " \
               "step 3/3 (100%)" in log and "ETA" in log
        # waiting was measured, and cost a small share of what the run itself spent (the
        # bound is loose: this run is short, and CI shares its machine)
        assert 0 < result.wait_cpu_s < result.machine_cpu_s
        assert result.wait_share < 0.15, (result.wait_cpu_s, result.machine_cpu_s)
    finally:
        # Assert: nothing left running under this FLWR_HOME (SuperLink, SuperExec, Ray)
        assert processes_of(flwr_home) == []


def test_each_flwr_home_gets_its_own_local_superlink_ports(tmp_path) -> None:
    # Prepare / Execute
    from fedbicross_flwr.runners.simulation import flwr_env, local_superlink_ports

    first = local_superlink_ports(tmp_path / "a")
    again = local_superlink_ports(tmp_path / "a")
    env = flwr_env(tmp_path / "a")
    # Assert: chosen once and kept (every flwr call of a run must reach the same SuperLink),
    # two distinct non-default ports, and exported to the flwr processes
    assert first == again
    ports = {int(first["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]),
             int(first["FLWR_LOCAL_CONTROL_API_PORT"])}
    assert len(ports) == 2 and all(1024 < p < 65536 for p in ports)
    assert env["FLWR_LOCAL_CONTROL_API_PORT"] == first["FLWR_LOCAL_CONTROL_API_PORT"]


def test_waiting_for_a_run_reads_its_status_when_the_log_stream_ends(tmp_path,
                                                                     monkeypatch) -> None:
    import subprocess
    import time

    from fedbicross_flwr.runners import simulation

    calls = []

    def status(run_id, home):  # "running" while the stand-in log stream is open
        calls.append(time.monotonic())
        return ("running", "") if log.poll() is None else ("finished:completed", "")

    monkeypatch.setattr(simulation, "run_status", status)
    # Execute: a log stream that ends after 1 s; the safety check would come after 120 s
    log = subprocess.Popen(["sleep", "1"])
    start = time.monotonic()
    result = simulation.wait_for_final_status("7", tmp_path, log, start + 60)
    # Assert: one status read, right after the stream ended (no polling while it ran)
    assert result == ("finished:completed", "")
    assert len(calls) == 1 and 0.9 < calls[0] - start < 10


def test_waiting_backs_off_when_the_log_stream_ended_early(tmp_path, monkeypatch) -> None:
    import subprocess
    import time

    from fedbicross_flwr.runners import simulation

    calls = []

    def status(run_id, home):
        calls.append(time.monotonic())
        return ("running", "") if len(calls) < 4 else ("finished:failed", "boom")

    monkeypatch.setattr(simulation, "run_status", status)
    log = subprocess.Popen(["true"])
    log.wait()
    start = time.monotonic()
    result = simulation.wait_for_final_status("7", tmp_path, log, start + 60,
                                              backoff=(0.1, 0.4))
    gaps = [b - a for a, b in zip([start, *calls], calls)]
    assert result == ("finished:failed", "boom") and len(calls) == 4
    assert gaps[1] > 1.5 * 0.1 and gaps[2] > 1.5 * 0.2 and gaps[3] < 2 * 0.4 + 0.5
    # and a run that never finishes ends at the deadline
    calls.clear()
    monkeypatch.setattr(simulation, "run_status", lambda run_id, home: ("running", ""))
    assert simulation.wait_for_final_status("7", tmp_path, log, time.monotonic() + 0.5,
                                            backoff=(0.1, 0.1)) == ("timeout", "")


def test_cpu_accounting_counts_a_reaped_child_and_the_whole_machine() -> None:
    import subprocess
    import sys

    from fedbicross_flwr.runners.simulation import machine_cpu_seconds, own_cpu_seconds

    # Prepare: a child that burns about 0.6 s of CPU, then is reaped
    own, machine = own_cpu_seconds(), machine_cpu_seconds()
    subprocess.run([sys.executable, "-c",
                    "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.6: pass"], check=True)
    # Assert: both clocks saw it (the machine-wide one counts every process, so at least)
    assert 0.5 < own_cpu_seconds() - own < 3.0
    assert machine_cpu_seconds() - machine > 0.5
