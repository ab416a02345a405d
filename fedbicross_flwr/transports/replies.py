"""Flower replies read into partitions with the project's checks: one home for every reader.

A one-shot strategy (:mod:`.base`) and the project's Grid transport
(:class:`~fedbicross_flwr.transports.grid_transport.GridTransport`) read their replies here, with
the same rules:

* :func:`read_reply` reads one reply of any phase; anything malformed is a
  :class:`ReplyError` naming what is wrong (the site fails alone, the run goes on);
* :class:`Binding` says which node holds which partition, fixed before any instruction is
  sent: the operator's ``site-nodes`` (deployment), or the server's own assignment of
  partitions 0..n-1 to the connected nodes, sent with the instructions (simulation). A reply
  counts for partition p only if it comes from p's node and names p. Without a binding
  (deployment without ``site-nodes``) every site names its own partition, and a partition
  claimed by two nodes is refused for both;
* :func:`read_uploads` / :func:`read_personalized` read a ``train`` / ``train.personalize``
  round into a :class:`~fedbicross_flwr.protocol.PhaseResult` keyed by partition;
* :func:`accept_uploads` refuses an upload that
  :func:`~fedbicross_flwr.protocol.upload_problem` refuses (its model against w^(0), a forward
  pass on the fixed probe batch, its ``num-examples``, every metric in its range), and
  :func:`refuse_bad_metrics` a personalization reply whose metrics are out of range.

What is refused becomes a :class:`~fedbicross_flwr.protocol.ClientFailure` with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.protocol import (
    REPLY_CONFIG_KEYS,
    REPLY_RECORDS,
    SCORING_RECORDS,
    ClientFailure,
    ClientReply,
    ClientUpload,
    PhaseResult,
    StateDict,
    metrics_problem,
    upload_problem,
)

# Error replies the SuperLink makes itself when a node never answers (the message or its reply
# expired, or the node stopped sending heartbeats).
SUPERLINK_ERRORS = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                              ErrorCode.NODE_UNAVAILABLE})



class ReplyError(ValueError):
    """A reply that cannot be read: its site fails with this reason, the run goes on."""


@dataclass
class Reply:
    """One reply, read: what the site says it is and what it sent (not yet checked)."""

    node: int  # the Flower node id the reply came from (set by the SuperLink)
    partition_id: int | None  # the partition the reply names, when it names one
    error: str | None  # the error the client reported instead of a result
    state: StateDict | None  # the model (``train`` replies; ``train.personalize`` when asked)
    metrics: dict[str, Any]  # the metric record, values as sent (checked by the server)


def _partition_id(value: Any) -> int:
    """A reply's ``partition-id``: a whole number, or ReplyError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ReplyError(f"partition-id {value!r} is not a whole number")
    return int(value)


def read_reply(reply: Message, message_type: str, with_model: bool = False) -> Reply:
    """Read one reply of any phase, the one place that does; anything malformed is a
    :class:`ReplyError` naming what is wrong.

    A reply with a record its phase does not define, or a config key other than
    ``partition-id`` and ``error`` (:data:`~fedbicross_flwr.protocol.REPLY_RECORDS`), is
    refused. An error reply (Flower's, or the client's own ``error`` in its config record) is
    read into ``error``. Otherwise a ``train`` reply must carry an ``arrays`` ArrayRecord, a
    ``metrics`` MetricRecord and a ``partition-id``; a ``train.personalize`` reply a
    ``metrics`` record (its ``partition-id`` is optional), and, ``with_model`` (the server
    asked for the personalized model to score it), an ``arrays`` ArrayRecord too. Metric
    values are kept as sent: their names, types and ranges are the server's check
    (:func:`fedbicross_flwr.protocol.metrics_problem`).
    """
    try:
        return _read(reply, message_type, with_model)
    except ReplyError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a site sends, it fails alone
        raise ReplyError(f"malformed {message_type} reply: {type(err).__name__}: {err}"
                         ) from None


def _read(reply: Message, message_type: str, with_model: bool) -> Reply:
    node = int(reply.metadata.src_node_id)
    if reply.has_error():
        if reply.error.code in SUPERLINK_ERRORS:  # the SuperLink's: the site never answered
            return Reply(node, None, f"no reply ({reply.error.reason})", None, {})
        return Reply(node, None, f"error reply: {reply.error.reason}", None, {})
    content = reply.content
    records = REPLY_RECORDS[message_type] | (SCORING_RECORDS if with_model else frozenset())
    if extra := sorted(set(content) - records):
        raise ReplyError(f"the {message_type} reply has a record {extra[0]!r} that the phase "
                         f"does not define (it carries only {sorted(records)})")
    config: Any = content["config"] if "config" in content else ConfigRecord({})
    if not isinstance(config, ConfigRecord):
        raise ReplyError(f"its config is a {type(config).__name__}, not a ConfigRecord")
    if extra := sorted(set(config) - REPLY_CONFIG_KEYS):
        raise ReplyError(f"the {message_type} reply's config holds {extra[0]!r}, which the "
                         f"phase does not define (only {sorted(REPLY_CONFIG_KEYS)})")
    pid = _partition_id(config["partition-id"]) if "partition-id" in config else None
    if "error" in config:
        return Reply(node, pid, f"client error: {config['error']!s}", None, {})
    if "metrics" not in content or not isinstance(content["metrics"], MetricRecord):
        raise ReplyError(f"the {message_type} reply has no metrics record")
    metrics = dict(content["metrics"].items())
    state = None
    if message_type == "train" and pid is None:
        raise ReplyError("the train reply names no partition-id")
    if message_type == "train" or with_model:
        if "arrays" not in content or not isinstance(content["arrays"], ArrayRecord):
            what = "" if message_type == "train" else " of the personalized model, to score"
            raise ReplyError(f"the {message_type} reply has no arrays record (an "
                             f"ArrayRecord{what})")
        state = content["arrays"].to_torch_state_dict()
    return Reply(node, pid, None, state, metrics)



@dataclass
class Binding:
    """Which node holds which partition, for one run (of a strategy, or of the project).

    Attributes
    ----------
    node_of : dict[int, int]
        Partition-id -> Flower node id: fixed before round 1 when ``bound``, else filled from
        the sites' own claims in round 1.
    bound : bool
        The server fixed ``node_of`` before sending anything (``site-nodes``, or assigned).
    num_partitions : int
        > 0 when the server assigned partitions 0..n-1 of the run's dataset (simulation).
    """

    node_of: dict[int, int] = field(default_factory=dict)
    bound: bool = False
    num_partitions: int = 0

    @classmethod
    def of(cls, nodes: list[int], site_nodes: Mapping[int, int] | None,
           assign: bool) -> tuple[Binding, list[int]]:
        """The binding for the connected ``nodes``, and the nodes to instruct.

        Parameters
        ----------
        nodes : list[int]
            The connected node ids, sorted.
        site_nodes : mapping, optional
            Partition-id -> node id, the operator's binding (deployment: the run-config
            key ``site-nodes``, a strategy's ``site_nodes``).
        assign : bool
            Without ``site_nodes``: assign partitions 0..n-1 to ``nodes`` in order (True), or
            let every site name its own partition (False).
        """
        if site_nodes:
            for nid in sorted(set(nodes) - set(site_nodes.values())):
                log(logging.WARNING, "node %d is not in site-nodes: it is sent nothing", nid)
            registry = {int(p): int(n) for p, n in site_nodes.items()}
            return cls(registry, True), [n for n in registry.values() if n in nodes]
        if assign:
            return cls(dict(enumerate(nodes)), True, len(nodes)), list(nodes)
        log(logging.WARNING, "no site-nodes and the server assigns no partitions: each "
            "site's partition-id is its own claim; a partition claimed by two nodes is refused "
            "(bind sites to nodes with site-nodes)")
        return cls(), list(nodes)

    def instruction(self, pid: int | None) -> dict[str, Any]:
        """The partition keys of an instruction's config (only when the server bound it)."""
        if pid is None or not self.bound:
            return {}
        return {"partition-id": pid, "num-partitions": self.num_partitions or len(self.node_of)}

    def partition_of(self) -> dict[int, int]:
        """Node id -> partition-id."""
        return {nid: pid for pid, nid in self.node_of.items()}


def sender(reply: Message, destinations: Mapping[str, int]) -> int:
    """The node a reply stands for: its sender, or, for an error reply the SuperLink made (a
    node that never answered), the node the instruction went to (``destinations``: message
    id -> destination node).
    """
    src = int(reply.metadata.src_node_id)
    if src == SUPERLINK_NODE_ID:
        return destinations.get(reply.metadata.reply_to_message_id, src)
    return src


def no_reply(nid: int) -> str:
    """The reason of an instructed node that sent nothing back (no more is known)."""
    return "no reply"


def read_uploads(replies: Iterable[Message], destinations: Mapping[str, int],
                 binding: Binding, why_silent: Callable[[int], str] = no_reply) -> PhaseResult:
    """A ``train`` round's replies as a phase result keyed by partition (failures with
    reasons).

    A reply from another node than its instruction's, a reply that names another partition
    than the one its node was sent, and a partition claimed by two nodes (no binding) are
    refused; an instructed node without a reply (``why_silent(node)`` says why), and a bound
    partition whose node is not connected, are failures. ``destinations``: message id ->
    the node it was sent to, for every instruction of the round.
    """
    result = PhaseResult(num_partitions=binding.num_partitions)
    pid_of = binding.partition_of() if binding.bound else {}
    claims: dict[int, list[int]] = {}
    answered = set()
    for message in replies:
        nid = sender(message, destinations)
        expected = pid_of.get(nid)
        if nid != destinations.get(message.metadata.reply_to_message_id, nid):
            result.failures.append(ClientFailure(expected, str(nid), "train",
                                                 "a reply to another node's instruction"))
            continue
        answered.add(nid)
        try:
            reply = read_reply(message, "train")
        except ReplyError as err:
            result.failures.append(ClientFailure(expected, str(nid), "train", str(err)))
            continue
        if reply.error is not None:
            pid = expected if binding.bound else reply.partition_id
            result.failures.append(ClientFailure(pid, str(nid), "train", reply.error))
            continue
        pid, state = reply.partition_id, reply.state
        assert pid is not None and state is not None  # read_reply: a train reply has both
        if binding.bound and pid != expected:
            result.failures.append(ClientFailure(
                expected, str(nid), "train",
                f"spoofed partition-id: node {nid} replied as partition {pid}, but "
                f"partition {pid} belongs to node {binding.node_of.get(pid)} and this node "
                f"was sent partition {expected}'s instruction; reply refused"))
            continue
        claims.setdefault(pid, []).append(nid)
        result.replies[pid] = ClientReply(pid, state, reply.metrics)
    _settle_claims(result, claims, binding)
    for nid in sorted(set(destinations.values()) - answered):
        result.failures.append(ClientFailure(pid_of.get(nid), str(nid), "train",
                                             why_silent(nid)))
    if binding.bound:
        result.partitions = {pid: str(nid) for pid, nid in binding.node_of.items()}
        for pid, nid in sorted(binding.node_of.items()):
            if nid not in destinations.values():
                result.failures.append(ClientFailure(pid, str(nid), "train",
                                                     "node not connected"))
    return result


def _settle_claims(result: PhaseResult, claims: dict[int, list[int]], binding: Binding) -> None:
    """Refuse a partition claimed by two nodes; bind the others to their claimant (unbound)."""
    for pid, claimants in sorted(claims.items()):
        if len(claimants) > 1:
            del result.replies[pid]
            result.failures.append(ClientFailure(
                pid, ",".join(map(str, claimants)), "train",
                f"partition-id {pid} claimed by {len(claimants)} nodes {claimants}; all "
                "refused (bind sites to nodes with site-nodes)"))
        elif not binding.bound:
            binding.node_of[pid] = claimants[0]


def accept_uploads(phase: PhaseResult, reference: StateDict,
                   probe: Callable[[StateDict], str | None],
                   max_examples: Callable[[int], int | None],
                   optional: frozenset[str] = frozenset()
                   ) -> tuple[list[ClientUpload], dict[int, dict[str, Any]], list[ClientFailure]]:
    """The usable uploads (sorted by partition), each one's metrics, and the refused ones.

    An upload is refused when :func:`~fedbicross_flwr.protocol.upload_problem` names a
    problem: its state against ``reference`` (w^(0)) and the ``probe``, its ``num-examples``
    above ``max_examples(pid)``, or a metric out of its range (``optional``: the metrics it
    may add to the required ones).
    """
    uploads, metrics, refused = [], {}, []
    for pid in sorted(phase.replies):
        reply: ClientReply = phase.replies[pid]
        problem = upload_problem(reply, reference, probe, max_examples(pid), optional)
        if problem is not None:
            refused.append(ClientFailure(pid, phase.partitions.get(pid, "-"), "train",
                                         f"rejected upload: {problem}"))
            continue
        uploads.append(ClientUpload(pid, reply.state, int(reply.metrics["num-examples"])))
        metrics[pid] = reply.metrics
    return uploads, metrics, refused


def read_personalized(replies: Iterable[Message], destinations: Mapping[str, int],
                      binding: Binding, why_silent: Callable[[int], str] = no_reply,
                      with_model: bool = False) -> PhaseResult:
    """The personalization round's metrics keyed by partition (failures with reasons).

    Each reply must come from the node its partition's model went to and name no other
    partition; an instructed node without a reply is a failure (``why_silent(node)``). The
    metrics are kept as sent: :func:`refuse_bad_metrics` checks them against the site's
    upload. ``with_model`` (the server asked for the personalized models, to score them): a
    reply without one is refused, and the models are in the result's ``models``.
    """
    result = PhaseResult()
    pid_of = binding.partition_of()
    answered: set[int] = set()
    for message in replies:
        nid = sender(message, destinations)
        pid = pid_of.get(nid)
        if pid is None or nid in answered \
                or nid != destinations.get(message.metadata.reply_to_message_id, nid):
            continue  # not a node this round instructed, or not its own instruction
        answered.add(nid)
        try:
            reply = read_reply(message, "train.personalize", with_model=with_model)
        except ReplyError as err:
            result.failures.append(ClientFailure(pid, str(nid), "personalize", str(err)))
            continue
        if reply.error is not None:
            result.failures.append(ClientFailure(pid, str(nid), "personalize", reply.error))
        elif reply.partition_id is not None and reply.partition_id != pid:
            result.failures.append(ClientFailure(
                pid, str(nid), "personalize",
                f"spoofed partition-id: node {nid} replied as partition {reply.partition_id} "
                f"to partition {pid}'s model; reply refused"))
        else:
            result.replies[pid] = reply.metrics
            if reply.state is not None:
                result.models[pid] = reply.state
    for nid in sorted(set(destinations.values()) - answered):
        result.failures.append(ClientFailure(pid_of.get(nid), str(nid), "personalize",
                                             why_silent(nid)))
    return result


def refuse_bad_metrics(phase3: PhaseResult, local_metrics: Mapping[int, Mapping[str, Any]],
                       nodes: Mapping[int, str]) -> list[ClientFailure]:
    """Remove the phase-3 replies whose metrics are refused (:func:`metrics_problem`, and
    ``num-examples`` equal to the site's phase-1 count); their failures, with the reason.
    """
    refused = []
    for pid in sorted(phase3.replies):
        metrics, own = phase3.replies[pid], local_metrics.get(pid, {})
        problem = metrics_problem("train.personalize", metrics, own.get("n-test-personal"))
        if problem is None and metrics["num-examples"] != own.get("num-examples"):
            problem = (f"metric num-examples={metrics['num-examples']!r} differs from the "
                       f"{own.get('num-examples')!r} the site uploaded with in phase 1")
        if problem is not None:
            del phase3.replies[pid]
            refused.append(ClientFailure(pid, nodes.get(pid, "-"), "personalize",
                                         f"rejected metrics: {problem}"))
    return refused


__all__ = ["SUPERLINK_ERRORS", "Binding", "Reply", "ReplyError", "accept_uploads",
           "no_reply", "read_personalized", "read_reply", "read_uploads", "refuse_bad_metrics",
           "sender"]
