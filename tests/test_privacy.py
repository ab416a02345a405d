"""Privacy guard: what leaves a client is its model's parameters and buffers, metrics and its
partition-id; never images, labels or anything else.

The uploads are checked against an INDEPENDENT re-training with the client code (same seed,
CPU): the arrays a client sends must be exactly the trained model's ``state_dict`` (names,
shapes, dtypes, values), so no extra tensor can ride along under a model's name. The metric
names are pinned here, independently of the code's allowlist, so widening what a site sends
needs this file to change too. The leak the guard exists for (each training label sent as a
metric ``label-<i>``) is injected into the real ClientApp: the reply check below must catch it,
and the ClientApp itself must refuse to send it.

What this guards against is an accident in this project's code. In a deployment the ClientApp
a site runs comes in the app bundle (FAB) that the operator's ``flwr run`` ships, so an
operator could change the code and hide data in an allowed metric or buffer; a site pins the
bundle it has reviewed with ``fedbicross_flwr.deploy.supernode_gate`` (docs/SECURITY.md).
"""

from __future__ import annotations

import numbers

import pytest

import client_app.app as client_app_module
from fedbicross_flwr.client import REPLY_METRICS, run_local_training
from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.runners.inprocess import run_in_process

# A phase-3 reply holds the personalized model's arrays only when the server asked for them
# (a simulation asks, so that it scores the models itself; a deployment does not).
ALLOWED = {"train": {"arrays", "metrics", "config"},
           "train.personalize": {"metrics", "config"}}
ALLOWED_WHEN_ASKED = {"train.personalize": {"arrays"}}
# Every metric a site may report: aggregates over its data, no per-sample value.
ALLOWED_METRICS = {
    "train": {"num-examples", "train-loss", "val-acc", "test-acc", "test-acc-personal",
              "n-test", "n-test-personal", "train-seconds"},
    "train.personalize": {"num-examples", "acc-before", "acc-personal-before",
                          "val-acc-before", "acc-after", "acc-personal-after",
                          "val-acc-after"},
}


def tiny_run_config(tmp) -> dict:
    from tests.conftest import make_archive

    return {
        "dataset": "custom", "data-path": str(make_archive(tmp / "site.npz")),
        "in-channels": 1, "num-classes": 3, "num-clients": 3, "alpha": 1.0,
        "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1, "batch-size": 16,
        "local-lr": 0.01, "output-dir": str(tmp / "runs"), "run-name": "privacy",
        "progress": False, "node-wait-timeout": 0.0, "device": "cpu",
    }


@pytest.fixture(scope="module")
def grid_and_config(tmp_path_factory):
    run_config = tiny_run_config(tmp_path_factory.mktemp("privacy"))
    grid, _ = run_in_process(run_config, num_nodes=3)
    return grid, run_config


def check_replies(replies, asked_for_models: bool) -> None:
    """Every reply holds only the allowed records, config keys and metric names and values."""
    assert replies
    upload_names = {name for r in replies if r.metadata.message_type == "train"
                    for name in r.content["arrays"].keys()}
    for reply in replies:
        kind = reply.metadata.message_type
        assert not reply.has_error()
        extra = ALLOWED_WHEN_ASKED.get(kind, set()) if asked_for_models else set()
        assert set(reply.content.keys()) == ALLOWED[kind] | extra, kind
        if kind == "train.personalize" and extra:
            # the returned model has exactly the uploaded model's tensors, nothing beside them
            assert set(reply.content["arrays"].keys()) == upload_names
        # config: the partition-id and nothing else
        assert set(reply.content["config"].keys()) == {"partition-id"}
        # metrics: exactly the allowed names, each one scalar number (no per-sample values)
        assert set(reply.content["metrics"].keys()) == ALLOWED_METRICS[kind], kind
        for name, value in reply.content["metrics"].items():
            assert isinstance(value, numbers.Real) and not isinstance(value, bool), name
        # no other record type anywhere in the reply
        assert reply.content.array_records.keys() <= {"arrays"}
        assert set(reply.content.config_records) == {"config"}


def leak_labels_as_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation: the ClientApp's phase-1 metrics also carry each training label."""
    real = client_app_module.run_local_training

    def leaky(cfg, site, *args, **kwargs):
        model, metrics = real(cfg, site, *args, **kwargs)
        metrics.update({f"label-{i}": float(y) for i, y in enumerate(site.y_train.tolist())})
        return model, metrics

    monkeypatch.setattr(client_app_module, "run_local_training", leaky)


def phase1_reply(run_config: dict):
    """The real ClientApp's reply to the server's ``train`` message, for partition 0 of 3."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedbicross_flwr.model import initial_state

    init = initial_state(RunConfig.from_run_config(run_config), 1, 3)
    msg = Message(RecordDict({"arrays": ArrayRecord(init),
                              "config": ConfigRecord({"phase": "train"})}),
                  dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=dict(run_config))
    return client_app_module.app(msg, context)


def test_every_reply_holds_only_the_allowed_records(grid_and_config) -> None:
    grid, _ = grid_and_config
    assert len(grid.replies) == 6  # 3 uploads + 3 personalization reports
    check_replies(grid.replies, asked_for_models=True)  # a simulation scores them itself
    # the code's allowlist is the one pinned here
    assert {k: set(v) for k, v in REPLY_METRICS.items()} == ALLOWED_METRICS


def test_the_reply_check_catches_labels_sent_as_metrics(tmp_path, monkeypatch) -> None:
    # Prepare: the leak, with the ClientApp's own guard switched off
    leak_labels_as_metrics(monkeypatch)
    monkeypatch.setattr(client_app_module, "checked_reply_metrics", lambda kind, m: dict(m))
    # Execute
    reply = phase1_reply(tiny_run_config(tmp_path))
    # Assert: the labels did leave the client, and the reply check fails on them
    assert any(name.startswith("label-") for name in reply.content["metrics"])
    with pytest.raises(AssertionError):
        check_replies([reply], asked_for_models=False)


def test_the_client_app_refuses_to_send_labels_as_metrics(tmp_path, monkeypatch) -> None:
    from fedbicross_flwr.client import ReplyMetricsError

    # Prepare: the leak, with the guard on
    leak_labels_as_metrics(monkeypatch)
    # Execute + Assert: the ClientApp raises instead of replying (the Flower runtime then
    # sends only an error reply with this reason, as the in-process grid does)
    with pytest.raises(ReplyMetricsError, match=r"not allowed \['label-0'"):
        phase1_reply(tiny_run_config(tmp_path))
    # and a reply that is a list per sample, or lacks a metric, is refused too
    from fedbicross_flwr.client import checked_reply_metrics

    good = {name: 1.0 for name in ALLOWED_METRICS["train"]}
    assert checked_reply_metrics("train", good) == good
    with pytest.raises(ReplyMetricsError, match="must be one real number, got list"):
        checked_reply_metrics("train", {**good, "val-acc": [1.0, 0.0]})
    with pytest.raises(ReplyMetricsError, match=r"missing \['val-acc'\]"):
        checked_reply_metrics("train", {k: v for k, v in good.items() if k != "val-acc"})
    with pytest.raises(ReplyMetricsError, match="must be one real number, got bool"):
        checked_reply_metrics("train", {**good, "val-acc": True})


def test_an_upload_is_exactly_an_independent_retraining_of_the_model(grid_and_config) -> None:
    # Prepare: partition 0's phase-1 upload from the run above
    import torch

    from fedbicross_flwr.data.datasets import load_dataset
    from fedbicross_flwr.data.site import site_from_partition
    from fedbicross_flwr.model import initial_state

    grid, run_config = grid_and_config
    (upload,) = [r for r in grid.replies if r.metadata.message_type == "train"
                 and int(r.content["config"]["partition-id"]) == 0]
    sent = upload.content["arrays"].to_torch_state_dict()
    # Execute: the same client code trains partition 0 again, here (same seed, CPU)
    cfg = RunConfig.from_run_config(run_config)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                      cfg.in_channels, cfg.num_classes)
    site = site_from_partition(ds, cfg, 0, 3)
    model, _ = run_local_training(cfg, site, torch.device("cpu"),
                                  initial_state(cfg, 1, 3))
    own = model.state_dict()
    # Assert: the arrays sent are that model's state dict, no more, bit for bit
    assert list(sent) == list(own)
    for name, tensor in own.items():
        assert sent[name].dtype == tensor.dtype and sent[name].shape == tensor.shape, name
        assert torch.equal(sent[name], tensor), name
