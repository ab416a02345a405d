"""Well-formed but hostile replies are refused with a reason and cannot take a site's place.

One in-process run (real ServerApp/ClientApp, simulation partitions, fedavg1) with six nodes:
0 and 4 are honest; 1 replies as partition 4 (and answers before the real partition 4); 2
uploads a finite poisoned model (BN running_var = -1e6, whose outputs are NaN); 3 reports
num-examples = 1e9 (all the FedAvg weight); 5 never replies. A second run binds deployment
sites to nodes with ``site-nodes``.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedbicross_flwr.model import probe_for, weighted_average
from fedbicross_flwr.runners.inprocess import run_in_process
from tests.conftest import inprocess_config, make_archive


def _forged(msg: Message, pid: int, state=None, **metrics: float) -> Message:
    """A well-formed phase-1 reply that a hostile node makes up (no training: fast)."""
    state = state if state is not None else msg.content["arrays"].to_torch_state_dict()
    content = RecordDict({
        "arrays": ArrayRecord(state),
        "metrics": MetricRecord({"num-examples": 10.0, "val-acc": 0.5, "test-acc": 0.5,
                                 "test-acc-personal": 0.5, **metrics}),
        "config": ConfigRecord({"partition-id": pid})})
    return Message(content, reply_to=msg)


def _train_only(forge):
    """A node behaviour that forges its ``train`` reply and is honest otherwise."""
    def behaviour(msg, ctx, call):
        if msg.metadata.message_type != "train":
            return call(msg, ctx)
        return forge(msg, int(msg.content["config"]["partition-id"]))
    return behaviour


def _poisoned(msg: Message, pid: int) -> Message:
    state = msg.content["arrays"].to_torch_state_dict()  # w^(0): finite, passes the bounds
    state["bn1.running_var"].fill_(-1e6)  # every forward pass of it gives NaN
    return _forged(msg, pid, state)


poisoned_variance = _train_only(_poisoned)
inflated_count = _train_only(lambda msg, pid: _forged(msg, pid, **{"num-examples": 1e9}))


def claims_partition(claim: int):
    return _train_only(lambda msg, pid: _forged(msg, claim))


def silent_in_phase_one(msg, ctx, call):
    return None if msg.metadata.message_type == "train" else call(msg, ctx)


def _rows(run_dir) -> dict[int, dict]:
    with (run_dir / "clients.csv").open() as fh:
        return {int(r["partition-id"]): r for r in csv.DictReader(fh)}


def _config(tmp, name: str, **extra) -> dict:
    return inprocess_config(tmp, name, **extra)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cfg = _config(tmp, "hostile", **{"data-path": str(make_archive(tmp / "d.npz", n_train=150)),
                                     "num-clients": 6})
    behaviours = {1: claims_partition(4), 2: poisoned_variance, 3: inflated_count,
                  5: silent_in_phase_one}
    return run_in_process(cfg, num_nodes=6, behaviours=behaviours)


def test_each_hostile_reply_is_refused_with_its_reason(hostile_run) -> None:
    grid, run_dir = hostile_run
    summary = json.loads((run_dir / "summary.json").read_text())
    reasons = {f["partition_id"]: f["reason"] for f in summary["failures"]}
    assert sorted(reasons) == [1, 2, 3, 5]
    assert (f"spoofed partition-id: node {grid.node_ids[1]} replied as partition 4, but "
            f"partition 4 belongs to node {grid.node_ids[4]}") in reasons[1]
    assert "bn1.running_var has a BatchNorm variance <= 0" in reasons[2]
    assert "num-examples=1000000000 exceeds the" in reasons[3]
    assert "(inflated FedAvg weight)" in reasons[3]
    assert reasons[5].startswith("no reply")
    assert summary["num-completed"] == 2


def test_every_partition_has_a_row_with_its_state(hostile_run) -> None:
    _, run_dir = hostile_run
    rows = _rows(run_dir)
    assert sorted(rows) == [0, 1, 2, 3, 4, 5]  # the silent node's partition too
    assert {p: r["status"] for p, r in rows.items()} == {
        0: "ok", 1: "missing", 2: "missing", 3: "missing", 4: "ok", 5: "missing"}


def test_the_real_site_keeps_its_place_and_only_honest_uploads_are_averaged(hostile_run):
    grid, _ = hostile_run
    uploads = {}
    for reply in grid.replies:
        if reply.metadata.message_type == "train":
            uploads[reply.metadata.src_node_id] = reply
    honest = [uploads[grid.node_ids[i]] for i in (0, 4)]
    expected = weighted_average([r.content["arrays"].to_torch_state_dict() for r in honest],
                                [float(r.content["metrics"]["num-examples"]) for r in honest])
    sent = {m.metadata.dst_node_id: m for m in grid.sent
            if m.metadata.message_type == "train.personalize"}
    # Assert: partitions 0 and 4 go to their own nodes, with the honest average; the
    # spoofing node gets nothing
    assert sorted(sent) == sorted(grid.node_ids[i] for i in (0, 4))
    probe = probe_for(expected)
    for nid, msg in sent.items():
        state = msg.content["arrays"].to_torch_state_dict()
        assert int(msg.content["config"]["partition-id"]) == grid.node_ids.index(nid)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert probe(state) is None


def test_a_deployment_binds_sites_to_nodes_with_site_nodes(tmp_path) -> None:
    # Prepare: three deployment sites; the grid's node ids are known in advance (seed 0)
    rng = random.Random(0)
    node_ids = sorted(rng.getrandbits(63) for _ in range(3))
    paths = [make_archive(tmp_path / f"site{i}.npz", seed=20 + i) for i in range(3)]
    node_configs = [{"data-path": str(p), "partition-id": 10 + i} for i, p in enumerate(paths)]
    site_nodes = ",".join(f"{10 + i}={nid}" for i, nid in enumerate(node_ids))
    cfg = _config(tmp_path, "sites", **{"num-clients": 3, "site-nodes": site_nodes})
    # Execute: site 11's node replies as site 12 (and answers before it)
    grid, run_dir = run_in_process(cfg, num_nodes=3, node_configs=node_configs,
                                   behaviours={1: claims_partition(12)})
    # Assert: 11 refused as spoofed, 12 kept; every site has its row
    assert grid.node_ids == node_ids
    summary = json.loads((run_dir / "summary.json").read_text())
    (failure,) = summary["failures"]
    assert failure["partition_id"] == 11 and "spoofed partition-id" in failure["reason"]
    assert {p: r["status"] for p, r in _rows(run_dir).items()} == {10: "ok", 11: "missing",
                                                                  12: "ok"}
    assert "num-examples reported by the clients cannot be checked" in (
        run_dir / "log.txt").read_text()
