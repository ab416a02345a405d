"""`model-width` end to end: every client, server method and message uses the chosen width.

A width-8 federation runs through the real ServerApp/ClientApp (in-process grid) with
FedBiCross, and through the one-process engine with every one-shot method on the same clients;
an upload trained at another width is refused with a reason that names the width.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.model import build_resnet18, resnet18_shape
from fedbicross_flwr.runners.direct import run_direct_methods
from fedbicross_flwr.runners.inprocess import run_in_process

TINY_SERVER = {"num-clusters": 2, "noise-samples": 8, "synth-steps": 3, "synth-batch": 8,
               "server-epochs": 1, "fedisca-epochs": 1, "gen-epochs": 1, "gen-steps": 1,
               "gen-batch": 8, "dafl-epochs": 1, "dafl-iterations": 1, "dafl-batch": 8}


def _width(state: dict[str, torch.Tensor]) -> int:
    return resnet18_shape(state)[2]


def test_width_8_through_the_flower_apps(tiny_run_config) -> None:
    run_config = {**tiny_run_config, **TINY_SERVER, "method": "fedbicross", "model-width": 8}
    grid, run_dir = run_in_process(run_config, num_nodes=3)
    sent = {m.metadata.message_type: _width(m.content["arrays"].to_torch_state_dict())
            for m in grid.sent}
    uploads = [_width(r.content["arrays"].to_torch_state_dict()) for r in grid.replies
               if r.metadata.message_type == "train"]
    assert sent == {"train": 8, "train.personalize": 8}
    assert uploads == [8, 8, 8]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 3
    assert json.loads((run_dir / "knowledge.json").read_text())["model-width"] == 8


def test_every_one_shot_method_runs_at_width_8(tiny_run_config) -> None:
    cfg = RunConfig.from_run_config({**tiny_run_config, **TINY_SERVER, "model-width": 8,
                                     "run-name": "w8"})
    methods = ["fedavg1", "local", "central", "fedisca", "dense", "coboosting", "dafl",
               "fedbicross"]
    dirs = run_direct_methods(cfg, methods)
    for method in methods:
        summary = json.loads((dirs[method] / "summary.json").read_text())
        assert summary["num-completed"] == 3, method
        assert json.loads((dirs[method] / "run_config.json").read_text())["model-width"] == 8


def _wider_upload(msg, ctx, call):
    reply = call(msg, ctx)
    if msg.metadata.message_type != "train":
        return reply
    content = RecordDict({"arrays": ArrayRecord(build_resnet18(1, 3, 16).state_dict()),
                          "metrics": reply.content["metrics"], "config": reply.content["config"]})
    return Message(content, reply_to=msg)


def test_an_upload_of_another_width_is_refused_with_the_reason(tiny_run_config) -> None:
    run_config = {**tiny_run_config, "method": "fedavg1", "model-width": 8, "min-clients": 2}
    _, run_dir = run_in_process(run_config, num_nodes=3, behaviours={1: _wider_upload})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 2
    reasons = [f["reason"] for f in summary["failures"]]
    assert any("model width" in r and "16" in r and "model-width is 8" in r for r in reasons), \
        reasons
