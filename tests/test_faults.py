"""Faults at the sites: bad data, error replies, dropouts in either phase.

A site whose data cannot be used replies with an error that names the problem; the server logs
it by partition and reason, leaves the site out and goes on with the others. A client lost in
the personalization phase is reported missing, never averaged in as zero accuracy.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import app as client_app
from fedbicross_flwr.runners.inprocess import run_in_process
from tests.conftest import make_archive


# --- bad site archives ------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, **changes: np.ndarray) -> Path:
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    np.savez_compressed(dst, **arrays)
    return dst


def bad_archive(kind: str, folder: Path) -> Path:
    """A site archive with exactly one problem of the given kind."""
    good = make_archive(folder / f"good-for-{kind}.npz", seed=5)
    path = folder / f"{kind}.npz"
    if kind == "missing":
        return path  # never written
    if kind == "corrupt":  # a transfer cut short: the first half of a valid archive
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    if kind == "labels":  # class 7 in a 3-class federation
        with np.load(good) as npz:
            labels = npz["train_labels"].copy()
        labels[0, 0] = 7
        return _rewrite(good, path, train_labels=labels)
    if kind == "size":  # 32x32 images instead of 28x28
        return _rewrite(good, path, train_images=np.zeros((60, 32, 32), np.uint8))
    raise ValueError(kind)


# the problem each kind must be named by (a fragment of the reason)
BAD_DATA = {
    "missing": "site data archive not found",
    "corrupt": "cannot read data archive",
    "labels": "train_labels out of range [0, 3) (min 0, max 7)",
    "size": "train_images have shape (32, 32) per image, expected (28, 28)",
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_site_data_gets_an_error_reply_naming_the_problem(kind, tiny_run_config,
                                                               tmp_path) -> None:
    # Prepare: a deployment node whose data-path holds one problem
    path = bad_archive(kind, tmp_path)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=tiny_run_config,
                  node_config={"data-path": str(path), "partition-id": 4})
    msg = Message(RecordDict({"config": ConfigRecord({"phase": "train"})}), dst_node_id=7,
                  message_type="train")
    # Execute: the ClientApp does not raise
    reply = client_app(msg, ctx)
    # Assert: an ordinary reply holding only the partition-id and the reason
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"config"}
    config = dict(reply.content["config"])
    assert set(config) == {"partition-id", "error"} and config["partition-id"] == 4
    assert config["error"].startswith("DataError: ") and BAD_DATA[kind] in config["error"]
    assert str(path) in config["error"]


def _deployment(run_config: dict) -> dict:
    """The run config of a deployment: the sites read their own archives, the server none."""
    return {k: v for k, v in run_config.items() if k != "data-path"}


def _rows(run_dir: Path) -> dict[int, dict]:
    with (run_dir / "clients.csv").open() as fh:
        return {int(r["partition-id"]): r for r in csv.DictReader(fh)}


def test_federation_goes_on_without_the_sites_with_bad_data(tiny_run_config, tmp_path) -> None:
    # Prepare: two good sites (0, 1) and one site per kind of bad data (2..5)
    kinds = sorted(BAD_DATA)
    good = [make_archive(tmp_path / f"site{i}.npz", seed=10 + i) for i in range(2)]
    paths = good + [bad_archive(kind, tmp_path) for kind in kinds]
    node_configs = [{"data-path": str(p), "partition-id": i} for i, p in enumerate(paths)]
    cfg = _deployment({**tiny_run_config, "method": "fedavg1", "num-clients": 6,
                       "min-clients": 2})
    # Execute
    grid, run_dir = run_in_process(cfg, num_nodes=6, node_configs=node_configs)
    # Assert: the two good sites completed; every bad one is reported with its reason
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 2
    reasons = {f["partition_id"]: f["reason"] for f in summary["failures"]}
    assert sorted(reasons) == [2, 3, 4, 5]
    for pid, kind in zip(range(2, 6), kinds):
        assert reasons[pid].startswith("client error: DataError") and BAD_DATA[kind] in reasons[pid]
    rows = _rows(run_dir)
    assert [rows[p]["status"] for p in range(6)] == ["ok", "ok"] + ["missing"] * 4
    # Assert: the server log names partition and reason
    server_log = (run_dir / "log.txt").read_text()
    assert "client 4 (node" in server_log and BAD_DATA[kinds[2]] in server_log
    # Assert: only the good sites were asked to personalize
    personalize = [m for m in grid.sent if m.metadata.message_type == "train.personalize"]
    assert len(personalize) == 2


def test_client_lost_in_personalization_is_missing_not_zero(tiny_run_config) -> None:
    # Prepare: partition 1 trains, then never answers train.personalize
    def vanish(msg, ctx, call):
        return None if msg.metadata.message_type == "train.personalize" else call(msg, ctx)

    # Execute
    grid, run_dir = run_in_process({**tiny_run_config, "min-clients": 2}, num_nodes=3,
                                   behaviours={1: vanish})
    # Assert: row 1 missing with empty accuracies; means over partitions 0 and 2 only
    rows = _rows(run_dir)
    assert rows[1]["status"] == "missing" and rows[1]["acc-after"] == ""
    assert rows[1]["local-test-acc"] != ""  # its phase-1 upload was used
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = np.mean([float(rows[p]["acc-after"]) for p in (0, 2)])
    assert summary["acc-after-mean"] == pytest.approx(expected)
    assert summary["num-completed"] == 2
    lost = [f for f in summary["failures"] if f["phase"] == "personalize"]
    assert [(f["partition_id"], f["reason"]) for f in lost] == [
        (1, "no reply (Error: Reply Message Unavailable - The reply message has expired.)")]


def test_client_exception_in_phase_one_is_logged_and_left_out(tiny_run_config, caplog) -> None:
    # Prepare: node 0's ClientApp raises (the runtime turns it into an error reply)
    def crash(msg, ctx, call):
        broken = Context(run_id=1, node_id=ctx.node_id, state=ctx.state,
                         run_config={**ctx.run_config, "local-lr": -1.0},
                         node_config=ctx.node_config)
        return call(msg, broken)

    # Execute
    with caplog.at_level(logging.WARNING):
        _, run_dir = run_in_process({**tiny_run_config, "min-clients": 2}, num_nodes=3,
                                    behaviours={0: crash})
    # Assert: the error reply is reported with its reason; 1 and 2 completed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 2
    (failure,) = summary["failures"]
    assert failure["phase"] == "train" and failure["reason"].startswith("error reply: ")
    assert "local-lr" in failure["reason"]
    assert "left out in phase 1" in caplog.text


def test_too_few_usable_clients_stop_the_run_with_the_reasons(tiny_run_config,
                                                              tmp_path) -> None:
    # Prepare: 3 nodes, 2 of them with a missing archive; min-clients 2
    good = make_archive(tmp_path / "site0.npz")
    node_configs = [{"data-path": str(good), "partition-id": 0},
                    {"data-path": str(tmp_path / "nope1.npz"), "partition-id": 1},
                    {"data-path": str(tmp_path / "nope2.npz"), "partition-id": 2}]
    cfg = _deployment({**tiny_run_config, "min-clients": 2})
    # Execute / Assert: a clear stop, and failures.json names both partitions
    with pytest.raises(RuntimeError, match="only 1 usable client models, min-clients is 2"):
        run_in_process(cfg, num_nodes=3, node_configs=node_configs)
    failures = json.loads((Path(cfg["output-dir"]) / "test" / "failures.json").read_text())
    assert sorted(f["partition_id"] for f in failures) == [1, 2]


def test_site_personalizes_from_its_disk_copy_when_the_node_state_is_lost(tiny_run_config,
                                                                           tmp_path) -> None:
    # Prepare: a deployed site (data-path, output-dir) trains in phase 1
    from flwr.app import ArrayRecord

    from client_app.app import OWN_MODEL
    from fedbicross_flwr.model import build_resnet18

    node_config = {"data-path": str(make_archive(tmp_path / "site.npz")), "partition-id": 2,
                   "output-dir": str(tmp_path / "site-out")}
    ctx = Context(run_id=5, node_id=7, state=RecordDict(), run_config=tiny_run_config,
                  node_config=node_config)
    train = Message(RecordDict({"config": ConfigRecord({"phase": "train"})}), dst_node_id=7,
                    message_type="train")
    uploaded = client_app(train, ctx).content["arrays"].to_torch_state_dict()
    received = build_resnet18(1, 3).state_dict()
    msg = Message(RecordDict({"arrays": ArrayRecord(received)}), dst_node_id=7,
                  message_type="train.personalize")
    # Execute: phase 3 arrives with an EMPTY node state (what a SuperNode sometimes passes)
    fresh = Context(run_id=5, node_id=7, state=RecordDict(), run_config=tiny_run_config,
                    node_config=node_config)
    reply = client_app(msg, fresh)
    with_state = client_app(msg, ctx)
    # Assert: the site's disk copy is its uploaded model, and phase 3 gives the same result
    import torch

    on_disk = torch.load(tmp_path / "site-out" / "own-model-run5.pt", weights_only=True)
    assert all(torch.equal(on_disk[k], uploaded[k]) for k in uploaded)
    assert OWN_MODEL not in fresh.state and not reply.has_error()
    assert dict(reply.content["metrics"]) == dict(with_state.content["metrics"])
    assert (tmp_path / "site-out" / "personalized-run5.pt").is_file()


def test_deployment_server_needs_no_data_for_custom_sites(monkeypatch):
    # Prepare: a deployment run config (sites hold the data; the server has no data-path)
    from fedbicross_flwr import server
    from fedbicross_flwr.config.run_config import RunConfig

    cfg = RunConfig.from_run_config({"dataset": "custom", "in-channels": 3, "num-classes": 8})

    def no_load(*args, **kwargs):
        raise AssertionError("the server must not try to read a dataset here")

    monkeypatch.setattr(server, "load_dataset", no_load)
    # Execute / Assert
    assert server.dataset_shape(cfg) == (3, 8, None)
