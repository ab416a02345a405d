"""Bad uploads never reach FedBiCross's teachers; K is lowered when too few clients remain.

One in-process FedBiCross run (real ServerApp/ClientApp) with four sites: partitions 0 and 1
upload their trained models, partition 2 uploads a model with a NaN, partition 3 a model with
four classes instead of three. With num-clusters=3 and only two usable models, the method must
lower K to 2 with a warning; the teachers it is given must be exactly the two good uploads.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

import fedbicross_flwr.methods.fedbicross as fbc_adapter
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.runners.inprocess import run_in_process
from tests.conftest import make_archive


def _replace_arrays(reply: Message, msg: Message, state: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": reply.content["metrics"],
                          "config": reply.content["config"]})
    return Message(content, reply_to=msg)


def nan_upload(msg, ctx, call):
    reply = call(msg, ctx)
    if msg.metadata.message_type != "train":
        return reply
    state = reply.content["arrays"].to_torch_state_dict()
    state["layer2.0.conv1.weight"].view(-1)[3] = float("nan")
    return _replace_arrays(reply, msg, state)


def four_class_upload(msg, ctx, call):
    reply = call(msg, ctx)
    if msg.metadata.message_type != "train":
        return reply
    torch.manual_seed(3)
    return _replace_arrays(reply, msg, build_resnet18(1, 4).state_dict())


@pytest.fixture(scope="module")
def bad_upload_run(tmp_path_factory):
    """(grid, run_dir, teachers the method received) of the four-site run."""
    tmp = tmp_path_factory.mktemp("bad-uploads")
    run_config = {
        "dataset": "custom", "data-path": str(make_archive(tmp / "site.npz")),
        "in-channels": 1, "num-classes": 3, "num-clients": 4, "min-clients": 2,
        "alpha": 1.0, "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1,
        "batch-size": 16, "local-lr": 0.01, "output-dir": str(tmp / "runs"),
        "run-name": "bad-uploads", "progress": False, "node-wait-timeout": 0.0,
        "method": "fedbicross", "num-clusters": 3, "noise-samples": 8, "synth-steps": 2,
        "synth-batch": 8, "server-epochs": 1,
    }
    teachers: list[dict[str, torch.Tensor]] = []
    real = fbc_adapter.run_fedbicross

    def spy(client_models, *args, **kwargs):
        teachers.extend({k: v.detach().clone() for k, v in m.state_dict().items()}
                        for m in client_models)
        return real(client_models, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fbc_adapter, "run_fedbicross", spy)
        grid, run_dir = run_in_process(run_config, num_nodes=4,
                                       behaviours={2: nan_upload, 3: four_class_upload})
    return grid, run_dir, teachers


def _uploads(grid) -> dict[int, dict[str, torch.Tensor]]:
    return {int(r.content["config"]["partition-id"]): r.content["arrays"].to_torch_state_dict()
            for r in grid.replies if r.metadata.message_type == "train"}


def test_rejected_uploads_are_reported_with_their_reason(bad_upload_run) -> None:
    _, run_dir, _ = bad_upload_run
    summary = json.loads((run_dir / "summary.json").read_text())
    reasons = {f["partition_id"]: f["reason"] for f in summary["failures"]}
    assert sorted(reasons) == [2, 3]
    assert "layer2.0.conv1.weight contains NaN or Inf values" in reasons[2]
    assert "different number of classes" in reasons[3] and "(4 classes instead of 3)" in reasons[3]
    assert all(r.startswith("rejected upload: ") for r in reasons.values())
    assert summary["num-completed"] == 2 and summary["missing-partitions"] == [2, 3]


def test_nothing_a_rejected_client_sent_reaches_the_teachers(bad_upload_run) -> None:
    grid, _, teachers = bad_upload_run
    uploads = _uploads(grid)
    # Assert: exactly the two good uploads, in partition order, bit for bit
    assert len(teachers) == 2
    for teacher, pid in zip(teachers, (0, 1)):
        assert teacher.keys() == uploads[pid].keys()
        assert all(torch.equal(teacher[k], uploads[pid][k]) for k in teacher)
    # Assert: no teacher holds any tensor of a rejected upload
    for pid in (2, 3):
        for teacher in teachers:
            same = [k for k in teacher if teacher[k].shape == uploads[pid][k].shape
                    and torch.equal(teacher[k].float(), uploads[pid][k].float())
                    and teacher[k].is_floating_point() and teacher[k].numel() > 1
                    and not k.endswith(("running_var", "running_mean"))]
            assert same == [], (pid, same[:3])
    # Assert: the rejected clients were not asked to personalize
    personalize = [m for m in grid.sent if m.metadata.message_type == "train.personalize"]
    assert len(personalize) == 2


def test_k_is_lowered_with_a_warning_when_fewer_clients_remain(bad_upload_run) -> None:
    _, run_dir, _ = bad_upload_run
    server_log = (run_dir / "log.txt").read_text()
    assert "only 2 client models for num-clusters=3: using K=2" in server_log
    with (run_dir / "clusters.csv").open() as fh:
        clusters = {int(r["partition-id"]): int(r["cluster"]) for r in csv.DictReader(fh)}
    assert sorted(clusters) == [0, 1] and sorted(clusters.values()) == [0, 1]
    rows = list(csv.reader((run_dir / "weights.csv").open()))[1:]  # step, target, source, w
    assert {(int(r[1]), int(r[2])) for r in rows} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert Path(run_dir / "clients.csv").is_file()
