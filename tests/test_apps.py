"""ClientApp handlers called directly, and the ServerApp driven end to end in process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import OWN_MODEL
from client_app.app import app as client_app
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.runners.inprocess import run_in_process


def _context(run_config: dict, pid: int, n: int = 3) -> Context:
    return Context(run_id=1, node_id=100 + pid, state=RecordDict(), run_config=run_config,
                   node_config={"partition-id": pid, "num-partitions": n})


def _train_message() -> Message:
    return Message(RecordDict({"config": ConfigRecord({"phase": "train"})}), dst_node_id=101,
                   message_type="train")


def test_train_handler_replies_once_with_model_metrics_and_partition(tiny_run_config) -> None:
    # Prepare
    ctx = _context(tiny_run_config, pid=1)
    # Execute
    reply = client_app(_train_message(), ctx)
    # Assert: exactly the allowed records, no data or labels
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "config"}
    assert dict(reply.content["config"]) == {"partition-id": 1}
    reference = build_resnet18(1, 3).state_dict()
    state = reply.content["arrays"].to_torch_state_dict()
    assert set(state) == set(reference)
    assert all(state[k].shape == reference[k].shape for k in reference)
    metrics = reply.content["metrics"]
    assert {"num-examples", "val-acc", "test-acc", "test-acc-personal"} <= set(metrics)
    assert metrics["num-examples"] > 0
    assert OWN_MODEL in ctx.state  # kept locally for the personalization round


def test_personalize_handler_reports_before_and_after(tiny_run_config) -> None:
    ctx = _context(tiny_run_config, pid=0)
    client_app(_train_message(), ctx)
    received = build_resnet18(1, 3)
    msg = Message(RecordDict({"arrays": ArrayRecord(received.state_dict())}), dst_node_id=100,
                  message_type="train.personalize")
    reply = client_app(msg, ctx)
    assert set(reply.content.keys()) == {"metrics", "config"}  # no model, no data
    metrics = reply.content["metrics"]
    for key in ("acc-before", "acc-after", "acc-personal-before", "acc-personal-after"):
        assert 0.0 <= metrics[key] <= 1.0


def test_personalize_without_phase_one_is_an_error(tiny_run_config) -> None:
    ctx = _context(tiny_run_config, pid=0)
    msg = Message(RecordDict({"arrays": ArrayRecord(build_resnet18(1, 3).state_dict())}),
                  dst_node_id=100, message_type="train.personalize")
    with pytest.raises(RuntimeError, match="no local model"):
        client_app(msg, ctx)


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "clients.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("method", ["fedavg1", "local"])
def test_server_main_end_to_end_in_process(tiny_run_config, method: str) -> None:
    # Execute
    grid, run_dir = run_in_process({**tiny_run_config, "method": method}, num_nodes=3)
    # Assert: files
    assert json.loads((run_dir / "run_config.json").read_text())["method"] == method
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = _rows(run_dir)
    assert [int(r["partition-id"]) for r in rows] == [0, 1, 2]
    assert all(r["status"] == "ok" for r in rows)
    mean_after = np.mean([float(r["acc-after"]) for r in rows])
    assert summary["acc-after-mean"] == pytest.approx(mean_after)
    assert summary["paper-metric"] == summary["acc-after-mean"]
    assert (run_dir / "summary.md").is_file() and (run_dir / "log.txt").stat().st_size > 0
    # Assert: protocol: one train + one personalize message per node
    types = [m.metadata.message_type for m in grid.sent]
    assert types.count("train") == 3 and types.count("train.personalize") == 3
    # Assert: every client starts from the same initial model w^(0), sent with `train`
    inits = [m.content["arrays"].to_torch_state_dict()["conv1.weight"]
             for m in grid.sent if m.metadata.message_type == "train"]
    assert all(torch.equal(inits[0], w) for w in inits[1:])
    # Assert: fedavg1 sends the same model everywhere, local sends each its own
    sent = [m.content["arrays"].to_torch_state_dict()["fc.weight"]
            for m in grid.sent if m.metadata.message_type == "train.personalize"]
    same = all(torch.equal(sent[0], s) for s in sent[1:])
    assert same == (method == "fedavg1")


def test_failed_client_is_left_out_and_reported(tiny_run_config) -> None:
    def silent(msg, ctx, call):  # a node that never answers phase 1
        return None if msg.metadata.message_type == "train" else call(msg, ctx)

    cfg = {**tiny_run_config, "min-clients": 2}
    grid, run_dir = run_in_process(cfg, num_nodes=3, behaviours={2: silent})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 2
    assert any("no reply" in f["reason"] for f in summary["failures"])
