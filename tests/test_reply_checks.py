"""One hostile site can neither crash nor falsify a run: every reply is read in one place
(``transports.replies.read_reply``) and every metric the server reads is checked for name, type
and range (``protocol.metrics_problem``); a bad site fails alone, named, with its reason.

One in-process run (real ServerApp/ClientApp, fedavg1, 9 nodes): nodes 0 and 8 are honest;
in phase 1, node 1 sends its arrays as a ConfigRecord, node 2 an error with partition-id 'x',
node 3 val-acc = 1e9; in phase 3, node 4 reports acc-after = 1e9, node 5 acc-after = NaN,
node 6 sends no metrics record, node 7 partition-id 'x'.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedbicross_flwr.protocol import (
    ADAPTIVE_CLIPPING_METRICS,
    MAX_BATCHES_TRACKED,
    REPLY_METRICS,
    metrics_problem,
    validate_upload,
)
from fedbicross_flwr.runners.inprocess import run_in_process
from tests.conftest import make_archive

GOOD_TRAIN = {"num-examples": 40.0, "train-loss": 0.7, "val-acc": float("nan"), "test-acc": 0.5,
              "test-acc-personal": 0.25, "n-test": 60.0, "n-test-personal": 12.0,
              "train-seconds": 1.5}
GOOD_PERS = {"num-examples": 40.0, "acc-before": 0.5, "acc-personal-before": 0.5,
             "val-acc-before": 0.5, "acc-after": 0.75, "acc-personal-after": 1.0,
             "val-acc-after": float("nan")}


def test_the_good_metrics_pass_and_cover_every_allowed_name() -> None:
    assert set(GOOD_TRAIN) == REPLY_METRICS["train"]
    assert set(GOOD_PERS) == REPLY_METRICS["train.personalize"]
    assert metrics_problem("train", GOOD_TRAIN) is None
    assert metrics_problem("train.personalize", GOOD_PERS, n_test_personal=12.0) is None


@pytest.mark.parametrize(("phase", "change", "reason"), [
    ("train", {"val-acc": 1e9}, "val-acc=1000000000.0 is not an accuracy in [0, 1]"),
    ("train", {"test-acc": 7.0}, "test-acc=7.0 is not an accuracy in [0, 1]"),
    ("train", {"test-acc": float("nan")}, "test-acc=nan is not finite"),
    ("train", {"n-test": 60.5}, "n-test=60.5 is not a whole number"),
    ("train", {"n-test-personal": 61.0}, "n-test-personal=61.0 exceeds n-test=60.0"),
    ("train", {"test-acc-personal": float("nan")}, "test-acc-personal is NaN, but"),
    ("train", {"train-seconds": -1.0}, "train-seconds=-1.0 is negative"),
    ("train", {"label-0": 3.0}, "not allowed ['label-0']"),
    ("train", {"val-acc": [0.5, 0.5]}, "val-acc is a list, not one number"),
    ("train", {"val-acc": True}, "val-acc is a bool"),
    ("train.personalize", {"acc-after": 1e9}, "acc-after=1000000000.0 is not an accuracy"),
    ("train.personalize", {"acc-before": -5.0}, "acc-before=-5.0 is not an accuracy"),
    ("train.personalize", {"acc-after": float("nan")}, "acc-after=nan is not finite"),
    ("train.personalize", {"acc-personal-after": float("nan")}, "acc-personal-after is NaN"),
])
def test_each_bad_metric_is_refused_with_its_name(phase, change, reason) -> None:
    good = GOOD_TRAIN if phase == "train" else GOOD_PERS
    problem = metrics_problem(phase, {**good, **change}, n_test_personal=12.0)
    assert problem is not None and reason in problem


def test_a_missing_metric_and_a_non_record_are_refused() -> None:
    partial = {k: v for k, v in GOOD_PERS.items() if k != "acc-after"}
    assert "missing ['acc-after']" in metrics_problem("train.personalize", partial)
    assert "not a record" in metrics_problem("train", [1.0, 2.0])
    # an empty label-following split: NaN is the honest value there
    assert metrics_problem("train.personalize", {**GOOD_PERS, "acc-personal-after":
                                                 float("nan")}, n_test_personal=0.0) is None


def test_norm_bit_is_accepted_only_in_a_client_side_adaptive_clipping_round() -> None:
    # Flower's adaptiveclipping_mod adds norm_bit in a dp-adaptive-client-r round; anywhere
    # else (a one-shot phase 1, another multi-round method) a site has no reason to send it
    assert "not allowed ['norm_bit']" in metrics_problem("train", {**GOOD_TRAIN,
                                                                   "norm_bit": 1.0})
    assert metrics_problem("train", {**GOOD_TRAIN, "norm_bit": 1.0},
                           optional=ADAPTIVE_CLIPPING_METRICS) is None
    assert metrics_problem("train", GOOD_TRAIN, optional=ADAPTIVE_CLIPPING_METRICS) is None
    assert "norm_bit=0.5 is not 0 or 1" in metrics_problem(
        "train", {**GOOD_TRAIN, "norm_bit": 0.5}, optional=ADAPTIVE_CLIPPING_METRICS)
    assert "not allowed ['norm_bit']" in metrics_problem("train.personalize", {
        **GOOD_PERS, "norm_bit": 0.0}, n_test_personal=12.0)


def test_only_the_adaptive_client_side_dp_rounds_accept_norm_bit() -> None:
    from fedbicross_flwr.config.run_config import RunConfig
    from fedbicross_flwr.methods.rounds import reply_optional_metrics

    assert reply_optional_metrics(RunConfig(method="dp-adaptive-client-r")) == {"norm_bit"}
    for method in ("fedavg1", "fedbicross", "fedavg-r", "dp-fixed-client-r",
                   "dp-adaptive-server-r"):
        assert reply_optional_metrics(RunConfig(method=method)) == frozenset(), method


def _reply(message_type: str, records: dict) -> Message:
    """A reply to a ``message_type`` instruction carrying ``records``."""
    ins = Message(RecordDict({"config": ConfigRecord({"phase": "x"})}), dst_node_id=5,
                  message_type=message_type)
    ins.metadata.__dict__["_message_id"] = ins.object_id
    return Message(RecordDict(records), reply_to=ins)


@pytest.mark.parametrize(("message_type", "extra", "reason"), [
    ("train", {"labels": MetricRecord({"label-0": 3.0})},
     "the train reply has a record 'labels' that the phase does not define"),
    ("train.personalize", {"arrays": ArrayRecord({"w": torch.zeros(2)})},
     "the train.personalize reply has a record 'arrays' that the phase does not define"),
    ("train", {"config": ConfigRecord({"partition-id": 0, "site-name": "st-mary"})},
     "the train reply's config holds 'site-name', which the phase does not define"),
])
def test_a_record_the_phase_does_not_define_is_refused(message_type, extra, reason) -> None:
    from fedbicross_flwr.transports.replies import ReplyError, read_reply

    honest = {"metrics": MetricRecord(GOOD_TRAIN if message_type == "train" else GOOD_PERS),
              "config": ConfigRecord({"partition-id": 0})}
    if message_type == "train":
        honest["arrays"] = ArrayRecord({"w": torch.zeros(2)})
    assert read_reply(_reply(message_type, honest), message_type).error is None
    with pytest.raises(ReplyError) as refused:
        read_reply(_reply(message_type, {**honest, **extra}), message_type)
    assert reason in str(refused.value)


def test_num_batches_tracked_is_bounded() -> None:
    from fedbicross_flwr.model import build_resnet18

    reference = build_resnet18(1, 3, width=8).state_dict()
    state = {k: v.clone() for k, v in reference.items()}
    state["bn1.num_batches_tracked"] = torch.tensor(2**62)
    assert f"above the bound {MAX_BATCHES_TRACKED}" in validate_upload(state, reference)
    state["bn1.num_batches_tracked"] = torch.tensor(MAX_BATCHES_TRACKED)
    assert validate_upload(state, reference) is None


def _in_phase(message_type: str, forge):
    """A node behaviour that forges its reply to ``message_type``, honest otherwise."""
    def behaviour(msg, ctx, call):
        if msg.metadata.message_type != message_type:
            return call(msg, ctx)
        reply = call(msg, ctx)
        content = RecordDict(dict(reply.content.items()))
        for name, part in forge(reply).items():
            if part is None:
                del content[name]
            else:
                content[name] = part
        return Message(content, reply_to=msg)
    return behaviour


def _metrics(reply: Message, **changes) -> MetricRecord:
    return MetricRecord({**dict(reply.content["metrics"].items()), **changes})


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replies")
    train = lambda forge: _in_phase("train", forge)  # noqa: E731
    pers = lambda forge: _in_phase("train.personalize", forge)  # noqa: E731
    behaviours = {
        1: train(lambda r: dict(arrays=ConfigRecord({"conv1.weight": [0.0] * 10}))),
        2: train(lambda r: dict(config=ConfigRecord({"error": "boom", "partition-id": "x"}))),
        3: train(lambda r: dict(metrics=_metrics(r, **{"val-acc": 1e9}))),
        4: pers(lambda r: dict(metrics=_metrics(r, **{"acc-after": 1e9}))),
        5: pers(lambda r: dict(metrics=_metrics(r, **{"acc-after": float("nan")}))),
        6: pers(lambda r: dict(metrics=None)),
        7: pers(lambda r: dict(config=ConfigRecord({"partition-id": "x"}))),
    }
    cfg = {"dataset": "custom", "in-channels": 1, "num-classes": 3, "alpha": 100.0,
           "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1, "batch-size": 16,
           "local-lr": 0.01, "output-dir": str(tmp / "runs"), "run-name": "replies",
           "progress": False, "node-wait-timeout": 0.0, "device": "cpu", "min-clients": 2,
           "method": "fedavg1", "model-width": 8, "num-clients": 9,
           "data-path": str(make_archive(tmp / "d.npz", n_train=180))}
    return run_in_process(cfg, num_nodes=9, behaviours=behaviours)


def test_every_hostile_site_fails_alone_with_its_reason(hostile_run) -> None:
    _, run_dir = hostile_run
    summary = json.loads((run_dir / "summary.json").read_text())
    reasons = {f["partition_id"]: (f["phase"], f["reason"]) for f in summary["failures"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert reasons[1][0] == "train" and "no arrays record" in reasons[1][1]
    assert reasons[2][0] == "train" and "partition-id 'x' is not a whole number" in reasons[2][1]
    assert reasons[3][0] == "train" and "val-acc=1000000000.0 is not an accuracy" in reasons[3][1]
    assert reasons[4] == ("personalize", "rejected metrics: metric acc-after=1000000000.0 is "
                                         "not an accuracy in [0, 1]")
    assert reasons[5] == ("personalize", "rejected metrics: metric acc-after=nan is not finite")
    assert reasons[6][0] == "personalize" and "no metrics record" in reasons[6][1]
    assert reasons[7][0] == "personalize" and "partition-id 'x'" in reasons[7][1]


def test_the_means_are_over_the_honest_sites_only(hostile_run) -> None:
    _, run_dir = hostile_run
    with (run_dir / "clients.csv").open() as fh:
        rows = {int(r["partition-id"]): r for r in csv.DictReader(fh)}
    assert {p: r["status"] for p, r in rows.items()} == {
        0: "ok", 1: "missing", 2: "missing", 3: "missing", 4: "missing", 5: "missing",
        6: "missing", 7: "missing", 8: "ok"}
    summary = json.loads((run_dir / "summary.json").read_text())
    honest = [float(rows[p]["acc-after"]) for p in (0, 8)]
    assert summary["num-completed"] == 2
    assert math.isclose(summary["acc-after-mean"], sum(honest) / 2, rel_tol=1e-9)
    assert all(0.0 <= a <= 1.0 for a in honest)


def _small_run(tmp, name: str, **extra) -> dict:
    return {"dataset": "custom", "in-channels": 1, "num-classes": 3, "alpha": 100.0,
            "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1, "batch-size": 16,
            "local-lr": 0.01, "output-dir": str(tmp / "runs"), "run-name": name,
            "progress": False, "node-wait-timeout": 0.0, "device": "cpu", "min-clients": 2,
            "method": "fedavg1", "model-width": 8, "num-clients": 3,
            "data-path": str(make_archive(tmp / "d.npz", n_train=90)), **extra}


@pytest.mark.parametrize(("phase", "message_type"), [("train", "train"),
                                                    ("personalize", "train.personalize")])
def test_a_node_that_goes_offline_fails_at_once_not_at_the_timeout(phase, message_type,
                                                                   tmp_path,
                                                                   monkeypatch) -> None:
    import time

    from fedbicross_flwr.runners.inprocess import PENDING
    from fedbicross_flwr.transports import grid_transport

    monkeypatch.setattr(grid_transport, "POLL_SECONDS", 0.05)
    holder = {}

    def killed(msg, ctx, call):  # SIGKILL in this phase: no reply, and its heartbeats stop
        if msg.metadata.message_type == message_type:
            holder["grid"].node_ids.remove(msg.metadata.dst_node_id)
            return PENDING
        return call(msg, ctx)

    from fedbicross_flwr.runners import inprocess

    real_init = inprocess.InProcessGrid.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        holder["grid"] = self

    monkeypatch.setattr(inprocess.InProcessGrid, "__init__", init)
    start = time.monotonic()
    _, run_dir = run_in_process(_small_run(tmp_path, "offline", **{"round-timeout": 3600.0}),
                                num_nodes=3, behaviours={1: killed})
    assert time.monotonic() - start < 600  # not the hour of round-timeout
    summary = json.loads((run_dir / "summary.json").read_text())
    (failure,) = summary["failures"]
    assert (failure["partition_id"], failure["phase"]) == (1, phase)
    assert failure["reason"] == ("no reply: the node went offline (Flower stopped receiving "
                                 "its heartbeats)")
    # what the user gets: the other sites' results, the lost one missing (never zero)
    assert summary["num-completed"] == 2 and summary["missing-partitions"] == [1]


def test_a_failed_pull_is_retried_and_loses_no_honest_reply(tmp_path, monkeypatch) -> None:
    from fedbicross_flwr.runners import inprocess
    from fedbicross_flwr.transports import grid_transport

    monkeypatch.setattr(grid_transport, "POLL_SECONDS", 0.01)
    real_pull, failures = inprocess.InProcessGrid.pull_messages, []

    def busy_once(self, message_ids):  # the SuperLink's sqlite under load: HTTP 500 once
        if not failures:
            failures.append(1)
            raise RuntimeError("500: database is locked")
        return real_pull(self, message_ids)

    monkeypatch.setattr(inprocess.InProcessGrid, "pull_messages", busy_once)
    _, run_dir = run_in_process(_small_run(tmp_path, "busy"), num_nodes=3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert failures == [1] and summary["failures"] == [] and summary["num-completed"] == 3


def _lost_reply(reply):
    """Flower's grid's error for a reply whose objects could not be pulled (http_grid.py)."""
    from flwr.app import Error, Message
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    lost = Message(Error(ErrorCode.MESSAGE_UNAVAILABLE,
                         "Reply message objects are unavailable. The sender may not have "
                         "completed the upload before the object-push session expired. "
                         "database is locked"), reply_to=reply)
    lost.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
    lost.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # the ServerApp grid's node
    return lost


@pytest.mark.parametrize("losses", [1, 3])
def test_a_reply_lost_in_transit_is_asked_for_again(losses, tmp_path, monkeypatch) -> None:
    from fedbicross_flwr.runners import inprocess
    from fedbicross_flwr.transports import grid_transport

    monkeypatch.setattr(grid_transport, "POLL_SECONDS", 0.01)
    real_pull, lost, holder = inprocess.InProcessGrid.pull_messages, [], {}

    def lossy(self, message_ids):  # the node of partition 1 answers, its reply is lost
        holder["grid"] = self
        out = []
        for reply in real_pull(self, message_ids):
            if (reply.metadata.message_type == "train" and not reply.has_error()
                    and reply.content["config"]["partition-id"] == 1 and len(lost) < losses):
                lost.append(reply.metadata.src_node_id)
                reply = _lost_reply(reply)
            out.append(reply)
        return out

    monkeypatch.setattr(inprocess.InProcessGrid, "pull_messages", lossy)
    _, run_dir = run_in_process(_small_run(tmp_path, f"lost{losses}"), num_nodes=3)
    summary = json.loads((run_dir / "summary.json").read_text())
    trains = [m for m in holder["grid"].sent if m.metadata.message_type == "train"
              and m.metadata.dst_node_id == lost[0]]
    if losses <= grid_transport.RESENDS:  # sent again, and the honest site is kept
        assert len(trains) == 1 + losses
        assert summary["failures"] == [] and summary["num-completed"] == 3
    else:  # still lost after RESENDS: that site fails, by name, and the run goes on
        assert len(trains) == 1 + grid_transport.RESENDS
        (failure,) = summary["failures"]
        assert failure["partition_id"] == 1 and failure["phase"] == "train"
        assert "Reply message objects are unavailable" in failure["reason"]
        assert summary["num-completed"] == 2


def test_only_the_transient_errors_are_asked_for_again() -> None:
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.common.constant import ErrorCode

    from fedbicross_flwr.transports.grid_transport import transient_failure

    ins = Message(RecordDict({"config": ConfigRecord({"phase": "train"})}), dst_node_id=5,
                  message_type="train")
    ins.metadata.__dict__["_message_id"] = ins.object_id
    reply = Message(RecordDict({"config": ConfigRecord({"x": 1})}), reply_to=ins)
    assert transient_failure(_lost_reply(reply))
    assert not transient_failure(reply)
    expired = Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "The reply message has "
                            "expired."), reply_to=ins)
    raised = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=ins)
    assert not transient_failure(expired) and not transient_failure(raised)
    # a SuperNode's "ClientApp stopped responding" (missed heartbeats, also under load)
    stopped = Message(Error(ErrorCode.CLIENT_APP_CRASHED, "ClientApp stopped responding."),
                      reply_to=ins)
    assert transient_failure(stopped)
