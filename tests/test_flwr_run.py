"""A REAL `flwr run` simulation (SuperLink + Ray, 3 clients) on a tiny archive."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedbicross_flwr.simulation import processes_of, simulate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.flwr_run
def test_flwr_run_simulation_completes_and_writes_results(tiny_run_config, tmp_path) -> None:
    # Prepare: an isolated FLWR_HOME; the tiny config with fedavg1
    flwr_home = tmp_path / "flwr-home"
    run_config = {**tiny_run_config, "run-name": "flwr-e2e", "node-wait-timeout": 60.0}
    try:
        # Execute
        result = simulate(ROOT, run_config, num_supernodes=3, flwr_home=flwr_home,
                          timeout=900, stream=False)
        # Assert: the run really completed (flwr run itself exits 0 on failure)
        assert result.ok, f"flwr run failed: {result.status} {result.details}"
        assert result.run_dir == Path(run_config["output-dir"]) / "flwr-e2e"
        summary = json.loads((result.run_dir / "summary.json").read_text())
        assert summary["num-completed"] == 3 and summary["acc-after-mean"] is not None
        with (result.run_dir / "clients.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(int(r["partition-id"]) for r in rows) == [0, 1, 2]
    finally:
        # Assert: nothing left running under this FLWR_HOME (SuperLink, SuperExec, Ray)
        assert processes_of(flwr_home) == []


def test_each_flwr_home_gets_its_own_local_superlink_ports(tmp_path) -> None:
    # Prepare / Execute
    from fedbicross_flwr.simulation import flwr_env, local_superlink_ports

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
