"""FedBiCross through the real ServerApp/ClientApp (in-process grid) on a tiny config."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.runners.inprocess import run_in_process

TINY_SERVER = {"method": "fedbicross", "num-clusters": 2, "noise-samples": 8,
               "synth-steps": 3, "synth-batch": 8, "server-epochs": 1}


def test_fedbicross_end_to_end_in_process(tiny_run_config) -> None:
    # Execute
    grid, run_dir = run_in_process({**tiny_run_config, **TINY_SERVER}, num_nodes=3)
    # Assert: every client personalized from its own cluster's model
    with (run_dir / "clusters.csv").open() as fh:
        clusters = {int(r["partition-id"]): int(r["cluster"]) for r in csv.DictReader(fh)}
    assert sorted(clusters) == [0, 1, 2] and set(clusters.values()) == {0, 1}
    pid_of_node = {}
    for reply in grid.replies:
        if reply.metadata.message_type == "train":
            pid_of_node[reply.metadata.src_node_id] = int(reply.content["config"]["partition-id"])
    sent = {pid_of_node[m.metadata.dst_node_id]: m.content["arrays"].to_torch_state_dict()
            for m in grid.sent if m.metadata.message_type == "train.personalize"}
    for a in range(3):
        for b in range(3):
            same = torch.equal(sent[a]["fc.weight"], sent[b]["fc.weight"])
            assert same == (clusters[a] == clusters[b])
    # Assert: artefacts
    rows = np.loadtxt(run_dir / "weights.csv", delimiter=",", skiprows=1)  # step,k,j,w
    assert rows.shape == (3 * 2 * 2, 4)  # T=3 steps x K targets x K sources
    per_row = {}
    for step, k, _, w in rows:
        per_row[(step, k)] = per_row.get((step, k), 0.0) + w
    assert np.allclose(list(per_row.values()), 1.0, atol=1e-5)  # each w_k on the simplex
    for name in ("weights.png", "synthetic.png", "fedbicross.json", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 3
    assert summary["method-diagnostics"]["stage-times-s"]["synthesis"] > 0


def test_run_config_maps_onto_algorithm_settings() -> None:
    cfg = RunConfig.from_run_config({"noise-momentum": 0.9, "kd-temperature": 20.0,
                                     "precision": "bf16", "bilevel-val-fraction": 0.2})
    s = FedBiCrossSettings.of(cfg)
    assert s.noise_momentum == 0.9  # beta of Eq. 3, as in the paper and the run config
    assert (s.kd_temperature, s.bilevel_val_fraction, s.precision) == (20.0, 0.2, "bf16")
    assert (s.synth_steps, s.synth_batch, s.bn_weight) == (500, 256, 10.0)
