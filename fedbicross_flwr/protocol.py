"""The one-shot protocol's types: what a client sends, what can go wrong, what is accepted.

This module imports nothing else from the package (only the standard library and torch), so
the server, the transports, the methods and the tests can all depend on it without cycles.

* :class:`ClientUpload` - a client's single accepted upload, as a server method sees it;
* :class:`ClientReply` - a phase-1 reply as a transport delivers it (not yet checked);
* :class:`ClientFailure` / :class:`PhaseResult` - what one phase brought back;
* :data:`REPLY_METRICS` - the metric names a client may send, per message type;
* :data:`REPLY_RECORDS` / :data:`REPLY_CONFIG_KEYS` - the records a reply may carry
  (:data:`SCORING_RECORDS` too in a phase 3 that asked for the model: :data:`RETURN_MODEL`);
* :func:`validate_upload` - why an uploaded state dict is refused, or None;
* :func:`metrics_problem` - why a reply's metrics are refused (name, type, range), or None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]

# Bounds on the values of an uploaded ResNet-18 (see validate_upload). They are chosen with a
# wide margin above what honest training should give (weights start of order 0.1 under Kaiming
# initialisation and SGD with weight decay keeps them small; BatchNorm statistics of images
# normalised to [-1, 1] stay moderate); they have not been measured on models trained at the
# paper's scale. A model scaled by 1e30 or holding 3.4e38 (the float32 maximum) is refused.
MAX_ABS_WEIGHT = 1e4  # parameters (conv/linear weights and biases, BN affine)
MAX_ABS_RUNNING_MEAN = 1e6  # BN running_mean
MAX_RUNNING_VAR = 1e12  # BN running_var (a standard deviation of 1e6)
MAX_BATCHES_TRACKED = 10**9  # BN num_batches_tracked: a billion training steps
MAX_COUNT = 10**9  # a reported number of examples (n-test, n-test-personal)

# What a client may report, per message type: aggregates over its data (accuracies, counts,
# a loss, a time), never per-example values or per-class counts. The ClientApp sends exactly
# these names (client.checked_reply_metrics) and the server accepts exactly these names, each
# in its range (metrics_problem).
REPLY_METRICS: dict[str, frozenset[str]] = {
    "train": frozenset({"num-examples", "train-loss", "val-acc", "test-acc",
                        "test-acc-personal", "n-test", "n-test-personal", "train-seconds"}),
    "train.personalize": frozenset({"num-examples", "acc-before", "acc-personal-before",
                                    "val-acc-before", "acc-after", "acc-personal-after",
                                    "val-acc-after"}),
}
# The range of each metric. "accuracy": a fraction in [0, 1] on the official test split, never
# missing (every site has one); "accuracy-or-nan": in [0, 1], or NaN when its evaluation set is
# empty (the validation split, the label-following split); "count": a whole number in
# [0, MAX_COUNT]; "examples": num-examples (num_examples_problem); "loss" and "seconds": >= 0,
# finite ("loss" may be NaN: no training step was made).
METRIC_KINDS: dict[str, str] = {
    "num-examples": "examples", "train-loss": "loss", "val-acc": "accuracy-or-nan",
    "test-acc": "accuracy", "test-acc-personal": "accuracy-or-nan", "n-test": "count",
    "n-test-personal": "count", "train-seconds": "seconds", "acc-before": "accuracy",
    "acc-personal-before": "accuracy-or-nan", "val-acc-before": "accuracy-or-nan",
    "acc-after": "accuracy", "acc-personal-after": "accuracy-or-nan",
    "val-acc-after": "accuracy-or-nan", "norm_bit": "bit",
}
# Metrics a train reply adds in a round of a client-side adaptive DP wrapper only: Flower's
# adaptiveclipping_mod adds norm_bit, 1 if the site's update was clipped, which the server's
# DP wrapper counts. Anywhere else (a one-shot phase 1, another method's rounds) it is refused.
ADAPTIVE_CLIPPING_METRICS = frozenset({"norm_bit"})
# The records a reply of each phase carries (a Flower RecordDict's keys), and the keys of its
# config record. A reply with any other record or config key is refused: it is not read, and
# a site has no reason to send more than the protocol asks for.
REPLY_RECORDS: dict[str, frozenset[str]] = {
    "train": frozenset({"arrays", "metrics", "config"}),
    "train.personalize": frozenset({"metrics", "config"}),
}
REPLY_CONFIG_KEYS = frozenset({"partition-id", "error"})
# The key of a phase-3 instruction's config by which a simulation's server asks for the
# personalized model back, to score it itself (fedbicross_flwr.reports.scoring); only then may,
# and must, a train.personalize reply carry these records too. A deployment site never sends it.
RETURN_MODEL = "return-personalized-model"
SCORING_RECORDS = frozenset({"arrays"})

# The key of a round's config that tells a site which Flower client-side DP clipping mod to
# apply ("fixed" or "adaptive"; fedbicross_flwr.client.dp_clipping_mod).
CLIPPING_KEY = "dp-clipping"


@dataclass(frozen=True)
class ClientUpload:
    """One client's single upload (phase 1), accepted by the server."""

    partition_id: int  # stable client id (never the random Flower node id)
    state: StateDict  # the trained local model f_i (parameters and BN buffers, on the CPU)
    num_examples: int  # local training-set size (FedAvg weight)


@dataclass
class ClientReply:
    """A client's phase-1 answer: its model and metrics (checked by the server before use)."""

    partition_id: int
    state: StateDict
    metrics: dict[str, float]


@dataclass
class ClientFailure:
    """A client that did not answer, answered with an error, or sent a bad model."""

    partition_id: int | None  # None when the server cannot tell which partition it was
    node: str  # the transport's address of the client (Flower node id, or "local")
    phase: str  # "train" or "personalize"
    reason: str


@dataclass
class PhaseResult:
    """What one phase brought back.

    ``partitions`` binds every partition the transport instructed to the client address it
    instructed (whether it answered or not); it is empty when the sites name their own
    partitions (a deployment without ``site-nodes``). ``num_partitions`` > 0 says that the
    clients trained partition ``pid`` of ``num_partitions`` of the run's dataset, as the
    server assigned them (simulation), so the server knows each partition's size.
    ``bytes_down`` / ``bytes_up`` are the phase's traffic per partition
    (:mod:`fedbicross_flwr.transports.communication`).
    """

    replies: dict[int, Any] = field(default_factory=dict)  # partition-id -> reply
    failures: list[ClientFailure] = field(default_factory=list)
    partitions: dict[int, str] = field(default_factory=dict)  # partition-id -> node address
    num_partitions: int = 0
    bytes_down: dict[int, int] = field(default_factory=dict)  # partition-id -> bytes sent to it
    bytes_up: dict[int, int] = field(default_factory=dict)  # partition-id -> bytes it sent
    measured: bool = False  # bytes of the real messages (Flower), else the arrays' formula
    global_state: StateDict | None = None  # a multi-round method's w^(R) (methods.rounds)
    # phase 3, when the server asked for them: partition-id -> the personalized model it sent
    # back to be scored (fedbicross_flwr.reports.scoring); never counted in bytes_up
    models: dict[int, StateDict] = field(default_factory=dict)


def num_examples_problem(value: Any, bound: int | None) -> str | None:
    """Why a reported ``num-examples`` (a client's FedAvg weight) is refused, or None.

    Parameters
    ----------
    value : Any
        The reported metric (metrics travel as floats).
    bound : int or None
        The most training examples this client can have (its partition's size in simulation,
        ``max-num-examples`` when set); None: no bound is known.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric num-examples is missing or not a number ({_shown(value)})"
    if _as_float(value) is None:
        return f"metric num-examples={_shown(value)} is too large for a number of examples"
    if not math.isfinite(value) or value != int(value) or value < 1:
        return f"metric num-examples={value!r} is not a positive integer"
    if bound is not None and value > bound:
        return (f"metric num-examples={int(value)} exceeds the {bound} training examples this "
                "client can have (inflated FedAvg weight)")
    return None


def metrics_problem(message_type: str, metrics: Any, n_test_personal: float | None = None,
                    optional: frozenset[str] = frozenset()) -> str | None:
    """Why a reply's ``metrics`` are refused by the server, or None.

    The names must be exactly :data:`REPLY_METRICS` of ``message_type`` (plus, where given,
    some of ``optional``: :data:`ADAPTIVE_CLIPPING_METRICS` in a round of a client-side
    adaptive DP wrapper), every value one real
    number (not a bool, a list or a string) within its :data:`METRIC_KINDS` range. The
    label-following accuracies may be NaN only when their split is empty (``n-test-personal``
    = 0: in phase 1 the reply's own, in phase 3 ``n_test_personal``, the site's phase-1
    count); ``num-examples`` is checked by :func:`num_examples_problem`, with its bound.
    """
    allowed = REPLY_METRICS[message_type]
    if not isinstance(metrics, Mapping):
        return f"the {message_type} metrics are a {type(metrics).__name__}, not a record"
    extra = sorted(map(str, set(metrics) - allowed - optional))
    missing = sorted(allowed - set(metrics))
    if extra or missing:
        return (f"{message_type} metrics must be exactly {sorted(allowed)}: not allowed "
                f"{extra[:5]}{' ...' if len(extra) > 5 else ''}, missing {missing}")
    for name in sorted(allowed | (optional & set(metrics))):
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {name} is a {type(value).__name__}, not one number"
        kind, value = METRIC_KINDS[name], _as_float(value)
        if value is None:
            return f"metric {name}={_shown(metrics[name])} is too large to be a float"
        if math.isnan(value) and kind in ("accuracy-or-nan", "loss"):
            continue
        if kind == "examples":
            continue  # bounded by num_examples_problem, which knows the partition's size
        if not math.isfinite(value):
            return f"metric {name}={value!r} is not finite"
        if kind.startswith("accuracy") and not 0.0 <= value <= 1.0:
            return f"metric {name}={value!r} is not an accuracy in [0, 1]"
        if kind == "count" and (value != int(value) or not 0 <= value <= MAX_COUNT):
            return f"metric {name}={value!r} is not a whole number in [0, {MAX_COUNT}]"
        if kind == "bit" and value not in (0.0, 1.0):
            return f"metric {name}={value!r} is not 0 or 1"
        if kind in ("loss", "seconds") and value < 0:
            return f"metric {name}={value!r} is negative"
    personal = {"train": ("test-acc-personal",),
                "train.personalize": ("acc-personal-before", "acc-personal-after")}[message_type]
    if message_type == "train":
        n_test_personal = float(metrics["n-test-personal"])
        if metrics["n-test-personal"] > metrics["n-test"]:
            return (f"metric n-test-personal={metrics['n-test-personal']!r} exceeds "
                    f"n-test={metrics['n-test']!r} (the label-following split is a part of "
                    "the test split)")
    for name in personal:
        if math.isnan(float(metrics[name])) and n_test_personal:
            return (f"metric {name} is NaN, but the site's label-following split has "
                    f"n-test-personal={n_test_personal:g} examples")
    return None


def _as_float(value: int | float) -> float | None:
    """``value`` as a float, or None for an integer beyond the float range (a float of it
    raises OverflowError).
    """
    try:
        return float(value)
    except OverflowError:
        return None


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 24 characters (an integer of 400 digits stays one short line)."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def upload_problem(reply: ClientReply, reference: StateDict,
                   probe: Callable[[StateDict], str | None] | None,
                   max_examples: int | None,
                   optional: frozenset[str] = frozenset()) -> str | None:
    """Why a phase-1 (or one round's) reply is refused, or None: :func:`validate_upload` on
    its model, :func:`num_examples_problem` on its FedAvg weight (bounded by
    ``max_examples``), then :func:`metrics_problem` on every metric (``optional``: the
    metrics this round may add).
    """
    return (validate_upload(reply.state, reference, probe)
            or num_examples_problem(reply.metrics.get("num-examples")
                                    if isinstance(reply.metrics, Mapping) else None,
                                    max_examples)
            or metrics_problem("train", reply.metrics, optional=optional))


def validate_upload(state: Any, reference: StateDict,
                    probe: Callable[[StateDict], str | None] | None = None) -> str | None:
    """Why an uploaded state dict is refused, or None if it is a usable model.

    Checks, in order: a mapping of tensors with exactly the reference's keys; the classifier's
    number of classes; the model width (the first convolution's channels); every tensor's shape and dtype; finite values; magnitudes within
    :data:`MAX_ABS_WEIGHT` (parameters), :data:`MAX_ABS_RUNNING_MEAN` and
    :data:`MAX_RUNNING_VAR` (BatchNorm statistics); BatchNorm ``running_var`` > 0 and
    ``num_batches_tracked`` in [0, :data:`MAX_BATCHES_TRACKED`]; finally ``probe`` (e.g. a forward pass on a fixed batch).

    Parameters
    ----------
    state : Any
        What the client sent; anything but a mapping of ``str`` to tensors is refused.
    reference : StateDict
        The server's model of the same architecture (w^(0)).
    probe : callable, optional
        ``probe(state) -> reason or None``, run last, on a state that passed every other check.

    Returns
    -------
    str or None
        The first problem found (naming the tensor), or None.
    """
    if not isinstance(state, Mapping):
        return f"the upload is a {type(state).__name__}, not a state dict"
    missing = sorted(set(reference) - set(state))
    extra = sorted(map(str, set(state) - set(reference)))
    if missing or extra:
        return f"state dict keys differ from ResNet-18: missing {missing[:5]}, extra {extra[:5]}"
    for key in reference:
        if not isinstance(state[key], torch.Tensor):
            return f"{key} is a {type(state[key]).__name__}, not a tensor"
    head = [k for k, v in reference.items() if v.ndim == 2][-1:]  # the classifier's weight
    for key in head:
        got, want = tuple(state[key].shape), tuple(reference[key].shape)
        if got != want and len(got) == 2 and got[1:] == want[1:]:
            return (f"different number of classes: {key} has shape {got}, expected {want} "
                    f"({got[0]} classes instead of {want[0]})")
    stem = next(k for k, v in reference.items() if v.ndim == 4)  # the first convolution
    got, want = tuple(state[stem].shape), tuple(reference[stem].shape)
    if got != want and len(got) == 4 and got[1:] == want[1:]:
        return (f"different model width: {stem} has {got[0]} output channels, the run's "
                f"model-width is {want[0]} (set model-width={got[0]} on the server, or retrain "
                f"the client at width {want[0]})")
    for key, ref in reference.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{key} has dtype {got.dtype}, expected {ref.dtype}"
        if (problem := _value_problem(key, got)) is not None:
            return problem
    return probe(dict(state)) if probe is not None else None


def _value_problem(key: str, tensor: torch.Tensor) -> str | None:
    """Non-finite, out-of-bounds or impossible values of one tensor, or None."""
    if tensor.numel() == 0:
        return None
    if not tensor.is_floating_point():
        if key.endswith("num_batches_tracked") and int(tensor.min()) < 0:
            return f"{key} is negative ({int(tensor.min())})"
        if key.endswith("num_batches_tracked") and int(tensor.max()) > MAX_BATCHES_TRACKED:
            return (f"{key} is {int(tensor.max())}, above the bound {MAX_BATCHES_TRACKED} "
                    "training steps")
        return None
    if not bool(torch.isfinite(tensor).all()):
        return f"{key} contains NaN or Inf values"
    largest = float(tensor.detach().abs().max())
    if key.endswith("running_var"):
        smallest = float(tensor.min())
        if smallest <= 0:
            return f"{key} has a BatchNorm variance <= 0 ({smallest:g}); variances are positive"
        bound, what = MAX_RUNNING_VAR, "BatchNorm variance"
    elif key.endswith("running_mean"):
        bound, what = MAX_ABS_RUNNING_MEAN, "BatchNorm mean"
    else:
        bound, what = MAX_ABS_WEIGHT, "weight"
    if largest > bound:
        return (f"{key} holds a {what} of absolute value {largest:.3g}, above the bound "
                f"{bound:g} for a trained ResNet-18")
    return None
