"""`central`: one model on the pooled training data of the clients (simulation only)."""

from __future__ import annotations

import json

import pytest
import torch

import fedbicross_flwr.methods.central as central_module
from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import load_dataset
from fedbicross_flwr.data.site import site_from_partition
from fedbicross_flwr.methods.base import ClientUpload, MethodInput
from fedbicross_flwr.methods.central import central
from fedbicross_flwr.model import initial_state
from fedbicross_flwr.runners.direct import run_direct_methods


def test_central_trains_on_exactly_the_union_of_the_partitions(tiny_run_config,
                                                               monkeypatch) -> None:
    # Prepare: record what central trains on
    seen = {}
    real = central_module.train_local

    def recording(model, x, y, *args, **kwargs):
        seen["x"], seen["y"] = x.clone(), y.clone()
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(central_module, "train_local", recording)
    cfg = RunConfig.from_run_config({**tiny_run_config, "run-name": "central"})
    # Execute: the whole protocol (clients, central, personalization, evaluation)
    run_dir = run_direct_methods(cfg, ["central"])["central"]
    # Assert: the pooled set is every client's training split (as the clients themselves
    # build it, validation shares excluded), nothing more
    ds = load_dataset("custom", "", cfg.data_path, False, 1, 3)
    sites = [site_from_partition(ds, cfg, pid, 3) for pid in range(3)]
    assert torch.equal(seen["x"], torch.cat([s.x_train for s in sites]))
    assert torch.equal(seen["y"], torch.cat([s.y_train for s in sites]))
    assert len(seen["y"]) == sum(s.n_train for s in sites) < len(ds.train)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 3
    assert summary["method-diagnostics"]["pooled-samples"] == len(seen["y"])
    assert summary["acc-before-mean"] is not None and summary["acc-after-mean"] is not None


def test_central_refuses_clients_that_are_not_the_simulated_partition(tiny_run_config,
                                                                      tmp_path) -> None:
    # Prepare: uploads whose sizes do not match the rebuilt partition (a deployment: each
    # site trains on its own archive, which the server cannot see)
    cfg = RunConfig.from_run_config(tiny_run_config)
    state = initial_state(cfg, 1, 3)
    uploads = [ClientUpload(pid, state, 1000 + pid) for pid in range(3)]
    inp = MethodInput(uploads, cfg, 1, 3, torch.device("cpu"), tmp_path)
    # Execute / Assert
    with pytest.raises(RuntimeError, match="simulation-only"):
        central(inp)
