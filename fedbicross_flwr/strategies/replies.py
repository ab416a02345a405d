"""A one-shot strategy's two rounds of replies, read into partitions with the project's checks.

Which node holds which partition is fixed before any instruction is sent (:class:`Binding`):
the operator's ``site_nodes`` (deployment), or the server's own assignment of partitions
0..n-1 to the connected nodes, sent with the instructions (simulation, as the project's
ServerApp does). A reply counts for partition p only if it comes from p's node and names p.
Without a binding (deployment without ``site_nodes``) every site names its own partition, and
a partition claimed by two nodes is refused for both.

Every reply is read with :func:`~fedbicross_flwr.engines.grid_transport.read_reply`; an upload
is then refused by :func:`~fedbicross_flwr.protocol.upload_problem` (its model against w^(0),
a forward pass on the fixed probe batch, its ``num-examples``, every metric in its range), a
personalization reply by :func:`~fedbicross_flwr.server.refuse_bad_metrics`. What is refused
becomes a :class:`~fedbicross_flwr.protocol.ClientFailure` with its reason; the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

from fedbicross_flwr.engines.grid_transport import ReplyError, read_reply
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.protocol import (
    ClientFailure,
    ClientReply,
    ClientUpload,
    PhaseResult,
    StateDict,
    upload_problem,
)
from fedbicross_flwr.server import refuse_bad_metrics


@dataclass
class Binding:
    """Which node holds which partition, for one run of a one-shot strategy.

    Attributes
    ----------
    node_of : dict[int, int]
        Partition-id -> Flower node id: fixed before round 1 when ``bound``, else filled from
        the sites' own claims in round 1.
    bound : bool
        The server fixed ``node_of`` before sending anything (``site_nodes``, or assigned).
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
            Partition-id -> node id, the operator's binding (deployment).
        assign : bool
            Without ``site_nodes``: assign partitions 0..n-1 to ``nodes`` in order (True), or
            let every site name its own partition (False).
        """
        if site_nodes:
            for nid in sorted(set(nodes) - set(site_nodes.values())):
                log(logging.WARNING, "node %d is not in site_nodes: it is sent nothing", nid)
            registry = {int(p): int(n) for p, n in site_nodes.items()}
            return cls(registry, True), [n for n in registry.values() if n in nodes]
        if assign:
            return cls(dict(enumerate(nodes)), True, len(nodes)), list(nodes)
        log(logging.WARNING, "no site_nodes and assign_partitions=False: each site's "
            "partition-id is its own claim; a partition claimed by two nodes is refused")
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


def read_uploads(replies: Iterable[Message], destinations: Mapping[str, int],
                 binding: Binding) -> PhaseResult:
    """Round 1's replies as a phase result keyed by partition (failures with reasons).

    A reply from another node than its instruction's, a reply that names another partition
    than the one its node was sent, and a partition claimed by two nodes (no binding) are
    refused; an instructed node without a reply, and a bound partition whose node is not
    connected, are failures.
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
                f"spoofed partition-id: node {nid} replied as partition {pid}, but was sent "
                f"partition {expected}'s instruction; reply refused"))
            continue
        claims.setdefault(pid, []).append(nid)
        result.replies[pid] = ClientReply(pid, state, reply.metrics)
    _settle_claims(result, claims, binding)
    for nid in sorted(set(destinations.values()) - answered):
        result.failures.append(ClientFailure(pid_of.get(nid), str(nid), "train", "no reply"))
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
                "refused (bind sites to nodes with site_nodes)"))
        elif not binding.bound:
            binding.node_of[pid] = claimants[0]


def accept_uploads(phase: PhaseResult, reference: StateDict,
                   probe: Callable[[StateDict], str | None],
                   max_examples: Callable[[int], int | None]
                   ) -> tuple[list[ClientUpload], dict[int, dict[str, Any]], list[ClientFailure]]:
    """The usable uploads (sorted by partition), each one's metrics, and the refused ones.

    An upload is refused when :func:`~fedbicross_flwr.protocol.upload_problem` names a
    problem: its state against ``reference`` (w^(0)) and the ``probe``, its ``num-examples``
    above ``max_examples(pid)``, or a metric out of its range.
    """
    uploads, metrics, refused = [], {}, []
    for pid in sorted(phase.replies):
        reply: ClientReply = phase.replies[pid]
        problem = upload_problem(reply, reference, probe, max_examples(pid))
        if problem is not None:
            refused.append(ClientFailure(pid, phase.partitions.get(pid, "-"), "train",
                                         f"rejected upload: {problem}"))
            continue
        uploads.append(ClientUpload(pid, reply.state, int(reply.metrics["num-examples"])))
        metrics[pid] = reply.metrics
    return uploads, metrics, refused


def read_personalized(replies: Iterable[Message], destinations: Mapping[str, int],
                      binding: Binding, local_metrics: Mapping[int, Mapping[str, Any]]
                      ) -> PhaseResult:
    """The personalization round's metrics keyed by partition (failures with reasons).

    Each reply must come from the node its partition's model went to and name no other
    partition; its metrics are checked against the site's round-1 upload
    (:func:`~fedbicross_flwr.server.refuse_bad_metrics`).
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
            reply = read_reply(message, "train.personalize")
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
    for nid in sorted(set(destinations.values()) - answered):
        result.failures.append(ClientFailure(pid_of.get(nid), str(nid), "personalize",
                                             "no reply"))
    nodes = {pid: str(nid) for pid, nid in binding.node_of.items()}
    local = {pid: dict(m) for pid, m in local_metrics.items()}
    result.failures.extend(refuse_bad_metrics(result, local, nodes))
    return result


__all__ = ["Binding", "accept_uploads", "read_personalized", "read_uploads", "sender"]
