"""Fuzz: whatever a site sends, the reply reader refuses it with a reason or accepts a possible
value, never a traceback.

Hypothesis builds replies of any record layout (any record names, each an ArrayRecord, a
MetricRecord or a ConfigRecord of any content, error replies with any code and reason) and
metrics of any value (NaN, inf, negative, huge, fractional counts, bools, lists, names added
or missing), uploads with any tensor changed (NaN, inf, huge, a wrong shape or dtype, not a
tensor, a key added or dropped), and personalized models sent back to be scored. Through the
project's entry points: ``read_reply`` (only :class:`ReplyError`), ``metrics_problem`` and
``refuse_bad_metrics`` (phase 3), ``upload_problem`` (phase 1) and the server's scoring
(:mod:`fedbicross_flwr.reports.scoring`). An accepted value is checked against an oracle
written here, apart from the code under test. Fixed seed, recorded example database
(tests/conftest.py).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import load_dataset
from fedbicross_flwr.model import build_resnet18, probe_for
from fedbicross_flwr.protocol import (
    MAX_ABS_RUNNING_MEAN,
    MAX_ABS_WEIGHT,
    MAX_BATCHES_TRACKED,
    MAX_COUNT,
    MAX_RUNNING_VAR,
    METRIC_KINDS,
    REPLY_METRICS,
    ClientReply,
    PhaseResult,
    metrics_problem,
    upload_problem,
)
from fedbicross_flwr.reports.scoring import ServerScoring
from fedbicross_flwr.server import refuse_bad_metrics
from fedbicross_flwr.transports.replies import ReplyError, read_reply
from tests.conftest import make_archive

TRAIN, PERS = "train", "train.personalize"
GOOD = {TRAIN: {"num-examples": 40.0, "train-loss": 0.7, "val-acc": math.nan, "test-acc": 0.5,
                "test-acc-personal": 0.25, "n-test": 30.0, "n-test-personal": 12.0,
                "train-seconds": 1.5},
        PERS: {"num-examples": 40.0, "acc-before": 0.5, "acc-personal-before": 0.5,
               "val-acc-before": 0.5, "acc-after": 0.75, "acc-personal-after": 1.0,
               "val-acc-after": math.nan}}
ODD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 0.5, 1.0, 1.0000001, 1e9, 1e308,
               -1e308, 2.5, 12.0, 40.0, 41.0, 30.0, 31.0, 1e-300, float(MAX_COUNT + 1)]
NUMBER = st.one_of(st.sampled_from(ODD_NUMBERS), st.floats(), st.integers(-(2**64), 2**64),
                   st.sampled_from([40, 12, 2**63, -(2**63), 10**400, -(10**400)]))
METRIC_VALUE = st.one_of(NUMBER, NUMBER, st.lists(st.floats(), max_size=3),
                         st.lists(st.integers(-5, 5), max_size=3))
CONFIG_VALUE = st.one_of(st.text(max_size=8), st.binary(max_size=4), st.booleans(), NUMBER,
                         st.lists(st.integers(-3, 3), max_size=2))


@st.composite
def metrics(draw: st.DrawFn, message_type: str) -> dict[str, Any]:
    """The good metrics of a phase with some values replaced, names dropped or added."""
    out = dict(GOOD[message_type])
    for name in draw(st.lists(st.sampled_from(sorted(out)), max_size=3, unique=True)):
        out[name] = draw(METRIC_VALUE)
    for name in draw(st.lists(st.sampled_from(sorted(out)), max_size=1)):
        out.pop(name, None)
    for name in draw(st.lists(st.sampled_from(["label-0", "norm_bit", "test-acc", "acc-after",
                                               "x"]) | st.text(max_size=6), max_size=1)):
        out[name] = draw(METRIC_VALUE)
    return out


def _arrays(draw: st.DrawFn) -> ArrayRecord:
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    return ArrayRecord({draw(st.text(max_size=6)): torch.zeros(shape, dtype=dtype)
                        for _ in range(draw(st.integers(0, 2)))})


@st.composite
def replies(draw: st.DrawFn, message_type: str) -> Message:
    """A reply to a ``message_type`` instruction with any record layout, or an error reply."""
    instruction = Message(RecordDict({"config": ConfigRecord({"partition-id": 0})}),
                          dst_node_id=5, message_type=message_type)
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    if draw(st.integers(0, 9)) == 0:
        return Message(Error(draw(st.integers(0, 600)), draw(st.text(max_size=20))),
                       reply_to=instruction)
    records: dict[str, Any] = {}
    names = draw(st.lists(st.sampled_from(["arrays", "metrics", "config"]) | st.text(max_size=6),
                          max_size=4, unique=True))
    for name in names:
        kind = draw(st.sampled_from(["arrays", "metrics", "config"]))
        try:
            if kind == "arrays":
                records[name] = _arrays(draw)
            elif kind == "metrics":
                records[name] = MetricRecord(draw(metrics(message_type)))
            else:
                records[name] = ConfigRecord(draw(st.dictionaries(
                    st.sampled_from(["partition-id", "error"]) | st.text(max_size=6),
                    CONFIG_VALUE, max_size=3)))
        except (TypeError, ValueError):  # Flower refuses to build it: no site can send it
            assume(False)
    return Message(RecordDict(records), reply_to=instruction)


def assert_possible_metrics(message_type: str, values: dict[str, Any],
                            n_test_personal: float | None) -> None:
    """The oracle: every accepted metric is one real number a site can have measured."""
    assert set(values) == REPLY_METRICS[message_type]
    for name, value in values.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        kind, v = METRIC_KINDS[name], float(value)
        if kind == "accuracy":
            assert 0.0 <= v <= 1.0, (name, v)
        elif kind == "accuracy-or-nan":
            assert math.isnan(v) or 0.0 <= v <= 1.0, (name, v)
        elif kind == "count":
            assert v == int(v) and 0 <= v <= MAX_COUNT, (name, v)
        elif kind == "seconds":
            assert math.isfinite(v) and v >= 0, (name, v)
        elif kind == "loss":
            assert math.isnan(v) or (math.isfinite(v) and v >= 0), (name, v)
    personal = ["test-acc-personal"] if message_type == TRAIN else [
        "acc-personal-before", "acc-personal-after"]
    n = float(values["n-test-personal"]) if message_type == TRAIN else n_test_personal
    if n:
        assert not any(math.isnan(float(values[p])) for p in personal)


@settings(max_examples=200)
@given(st.sampled_from([TRAIN, PERS]).flatmap(lambda t: st.tuples(st.just(t), replies(t))),
       st.booleans())
def test_any_reply_is_read_or_refused_with_a_reason(typed: tuple[str, Message],
                                                    with_model: bool) -> None:
    message_type, message = typed
    try:
        reply = read_reply(message, message_type, with_model=with_model)
    except ReplyError as err:
        assert str(err).strip()
        return
    if reply.error is not None:
        assert reply.state is None and reply.metrics == {}
        return
    assert isinstance(reply.metrics, dict)
    assert reply.partition_id is None or type(reply.partition_id) is int
    if message_type == TRAIN or with_model:
        assert isinstance(reply.state, dict)
        assert all(isinstance(t, torch.Tensor) for t in reply.state.values())
    else:
        assert reply.state is None
    if message_type == TRAIN:
        assert reply.partition_id is not None
    problem = metrics_problem(message_type, reply.metrics, n_test_personal=12.0)
    if problem is None:
        assert_possible_metrics(message_type, reply.metrics, 12.0)


@settings(max_examples=200)
@given(metrics(PERS), st.sampled_from([0.0, 12.0]))
@example({**GOOD[PERS], "acc-after": 1.0000001}, 12.0)
@example({**GOOD[PERS], "acc-personal-after": math.nan}, 0.0)
@example({**GOOD[PERS], "num-examples": 40.5}, 12.0)
@example({**GOOD[PERS], "acc-after": 10**400}, 0.0)  # found: OverflowError in the check
@example({**GOOD[PERS], "num-examples": -(10**400)}, 12.0)  # found: OverflowError
def test_any_phase_three_metrics_are_refused_or_possible(values: dict, n_personal: float
                                                          ) -> None:
    phase3 = PhaseResult(replies={0: dict(values)})
    local = {0: {"num-examples": 40.0, "n-test-personal": n_personal}}
    refused = refuse_bad_metrics(phase3, local, {0: "node"})
    if refused:
        assert 0 not in phase3.replies and refused[0].reason.startswith("rejected metrics: ")
        return
    assert_possible_metrics(PERS, phase3.replies[0], n_personal)
    assert phase3.replies[0]["num-examples"] == 40.0  # the phase-1 count, nothing else


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_resnet18(1, 3, width=4).state_dict()


ODD_FILLS = [math.nan, math.inf, -math.inf, 3.4e38, -1e6, 1e5, 0.0, -5.0, 20.0]


@st.composite
def tampered(draw: st.DrawFn, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``reference`` with up to three tensors changed in value, shape, dtype or kind."""
    state: dict[str, Any] = {k: v.clone() for k, v in reference.items()}
    for key in draw(st.lists(st.sampled_from(sorted(reference)), max_size=3, unique=True)):
        how = draw(st.sampled_from(["fill", "one", "scale", "shape", "dtype", "drop", "other"]))
        t = state[key]
        if how == "fill" or (how == "one" and t.numel()):
            value = draw(st.sampled_from(ODD_FILLS))
            if t.is_floating_point():
                (t.fill_(value) if how == "fill" else t.view(-1).__setitem__(0, value))
            else:
                t.fill_(draw(st.sampled_from([-1, 0, MAX_BATCHES_TRACKED + 1])))
        elif how == "scale" and t.is_floating_point():
            t.mul_(draw(st.sampled_from([1e3, 1e30, -1.0])))
        elif how == "shape":
            state[key] = torch.zeros(t.numel() + 1, dtype=t.dtype)
        elif how == "dtype":
            state[key] = t.to(draw(st.sampled_from([torch.float64, torch.float16,
                                                    torch.int64, torch.bool])))
        elif how == "drop":
            del state[key]
        elif how == "other":
            state[key] = draw(st.sampled_from([None, 1.0, "w", [0.0]]))
    if draw(st.booleans()) and draw(st.booleans()):
        state[draw(st.text(max_size=8))] = torch.zeros(1)
    return state


def assert_possible_model(state: dict, reference: dict[str, torch.Tensor]) -> None:
    """The oracle: an accepted model is ResNet-18 exactly, finite, within every bound."""
    assert set(state) == set(reference)
    for key, ref in reference.items():
        t = state[key]
        assert isinstance(t, torch.Tensor) and t.shape == ref.shape and t.dtype == ref.dtype
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), key
            bound = (MAX_RUNNING_VAR if key.endswith("running_var") else MAX_ABS_RUNNING_MEAN
                     if key.endswith("running_mean") else MAX_ABS_WEIGHT)
            assert float(t.abs().max()) <= bound, key
            if key.endswith("running_var"):
                assert float(t.min()) > 0, key
        elif key.endswith("num_batches_tracked"):
            assert 0 <= int(t.min()) and int(t.max()) <= MAX_BATCHES_TRACKED, key


@settings(max_examples=50)
@given(st.data(), metrics(TRAIN), st.sampled_from([None, 40, 39]))
def test_any_upload_is_refused_or_a_possible_model(reference, data, values, bound) -> None:
    state = data.draw(tampered(reference))
    reply = ClientReply(0, state, values)
    problem = upload_problem(reply, reference, probe_for(reference), bound)
    if problem is not None:
        assert problem.strip()
        return
    assert_possible_model(state, reference)
    assert_possible_metrics(TRAIN, values, None)
    n = values["num-examples"]
    assert n == int(n) and n >= 1 and (bound is None or n <= bound)


@pytest.fixture(scope="module")
def scoring(reference, tmp_path_factory) -> ServerScoring:
    path = make_archive(tmp_path_factory.mktemp("fuzz-score") / "d.npz")
    cfg = RunConfig.from_run_config({
        "dataset": "custom", "data-path": str(path), "in-channels": 1, "num-classes": 3,
        "num-clients": 3, "alpha": 1.0, "min-partition-size": 5, "model-width": 4,
        "device": "cpu"})
    return ServerScoring(cfg, load_dataset("custom", data_path=str(path), in_channels=1, num_classes=3), 3, reference,
                         probe_for(reference))


@settings(max_examples=8)
@given(st.data(), st.floats(0.0, 1.0))
def test_a_returned_model_is_refused_or_scored_within_zero_and_one(reference, scoring, data,
                                                                   claimed) -> None:
    returned = data.draw(tampered(reference))
    phase3 = PhaseResult(replies={1: {**GOOD[PERS], "acc-after": claimed}},
                         models={1: returned})
    refused, mismatches = scoring.score(phase3, {1: reference}, {1: "node"},
                                        torch.device("cpu"))
    if refused:
        assert 1 not in phase3.replies
        assert refused[0].reason.startswith("rejected personalized model: ")
        return
    assert_possible_model(returned, reference)
    scored = phase3.replies[1]
    for name in ("acc-before", "acc-after", "acc-personal-before", "acc-personal-after"):
        assert math.isnan(scored[name]) or 0.0 <= scored[name] <= 1.0
    assert [m.partition_id for m in mismatches] in ([], [1])
    assert phase3.models == {}
