"""The one-process runner (no Flower): several methods on the same trained clients."""

from __future__ import annotations

import csv

import pytest

from fedbicross_flwr.config import RunConfig
from fedbicross_flwr.direct import run_direct_methods


def _rows(path) -> dict[int, dict]:
    with (path / "clients.csv").open() as fh:
        return {int(r["partition-id"]): r for r in csv.DictReader(fh)}


def test_methods_share_the_same_client_models(tiny_run_config) -> None:
    # Prepare
    cfg = RunConfig.from_run_config({**tiny_run_config, "run-name": "shared"})
    # Execute
    dirs = run_direct_methods(cfg, ["local", "fedavg1"])
    # Assert: one folder per method, identical local models (phase 1 ran once)
    assert dirs["local"].name == "shared-local" and dirs["fedavg1"].name == "shared-fedavg1"
    local, avg = _rows(dirs["local"]), _rows(dirs["fedavg1"])
    assert sorted(local) == sorted(avg) == [0, 1, 2]
    for pid in local:
        assert local[pid]["local-test-acc"] == avg[pid]["local-test-acc"]
        # `local` sends each client its own model: "before" is the local model's accuracy
        assert float(local[pid]["acc-before"]) == pytest.approx(
            float(local[pid]["local-test-acc"]))
