"""The :class:`~fedbicross_flwr.engines.transport.Transport` over Flower's Grid (simulation or deployment).

``train`` (phase 1, or one round of a multi-round method) and ``train.personalize`` (phase 3)
as Flower messages. Results are keyed by partition-id, never by Flower node ids; each
partition is bound to one node, and a reply that claims another node's partition is refused
(see :class:`GridTransport`). :class:`fedbicross_flwr.engines.direct.DirectTransport` is the same
interface as plain function calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from fedbicross_flwr.config.run_config import RunConfig, parse_site_nodes
from fedbicross_flwr.engines.communication import message_bytes
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.protocol import (
    REPLY_CONFIG_KEYS,
    REPLY_RECORDS,
    RETURN_MODEL,
    SCORING_RECORDS,
    ClientFailure,
    ClientReply,
    PhaseResult,
    StateDict,
)

POLL_SECONDS = 3.0  # between pulls of the replies (as Flower's send_and_receive)
RESENDS = 2  # times an instruction is sent again after a transient failure (below)
# Flower's grid makes this error when a reply's objects cannot be pulled from the SuperLink
# (its object store or sqlite busy under load): the site did answer, its reply is gone.
LOST_REPLY_REASON = "Reply message objects are unavailable"

# Error replies the SuperLink makes itself when a node never answers (the message or its reply
# expired, or the node stopped sending heartbeats).
SUPERLINK_ERRORS = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                              ErrorCode.NODE_UNAVAILABLE})


def transient_failure(reply: Message) -> bool:
    """Whether ``reply`` is a Flower error that asking the site again may cure.

    Two errors are: a reply that arrived but whose objects could not be pulled
    (``MESSAGE_UNAVAILABLE``, :data:`LOST_REPLY_REASON`), and "ClientApp stopped responding"
    (``CLIENT_APP_CRASHED``), which a SuperNode stores when its ClientApp process missed its
    heartbeats: on a loaded machine that happens to a ClientApp that is still working (seen on
    loopback, flwr 1.42: the site then finished and logged its result, the server got the
    error). An error the ClientApp raised, or an expired instruction, is not asked again.
    """
    if not reply.has_error():
        return False
    code, reason = reply.error.code, reply.error.reason or ""
    return (code == ErrorCode.MESSAGE_UNAVAILABLE and reason.startswith(LOST_REPLY_REASON)) \
        or code == ErrorCode.CLIENT_APP_CRASHED


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


class GridTransport:
    """Phase 1 and phase 3 as Flower messages, each partition bound to one node.

    The binding is fixed before any instruction is sent: the operator's ``site-nodes``
    (deployment), or, in simulation, the server's own assignment of partitions 0..n-1 to the
    connected nodes (sent with the instructions). Every instruction for partition p goes to p's
    node, and a reply counts for p only if it comes from that node and names p: a node that
    claims another site's partition is refused and cannot displace it. Without ``site-nodes``
    in a deployment (the server holds no dataset) the sites name their own partitions, and a
    partition claimed by two nodes is refused for both.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.node_of: dict[int, int] = {}  # partition-id -> node id (bound, or claimed)
        self.bound = False  # node_of fixed by the server before phase 1
        self.num_partitions = 0  # > 0: the nodes train the server's partitions of the dataset
        self._phase1: PhaseResult | None = None  # phase 1's replies, shared by every method
        self.offline: set[int] = set()  # nodes that went offline during the last _send
        self.bytes_down: dict[int, int] = {}  # node -> bytes of the last _send's message to it
        self.bytes_up: dict[int, int] = {}  # node -> bytes of its reply

    def _wait_for_nodes(self, cfg: RunConfig) -> list[int]:
        deadline = time.monotonic() + cfg.node_wait_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= cfg.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        log(logging.INFO, "%d node(s) connected (num-clients=%d)", len(nodes), cfg.num_clients)
        if len(nodes) < cfg.effective_min_clients:
            raise RuntimeError(f"only {len(nodes)} nodes connected after node-wait-timeout="
                               f"{cfg.node_wait_timeout}s; min-clients is "
                               f"{cfg.effective_min_clients}")
        return nodes

    def _bind(self, cfg: RunConfig) -> list[int]:
        """Bind partitions to nodes (once per run); returns the connected nodes to instruct."""
        nodes = self._wait_for_nodes(cfg)
        if self.bound:
            return [nid for nid in self.node_of.values() if nid in nodes]
        registry = parse_site_nodes(cfg.site_nodes)
        if registry:
            for nid in sorted(set(nodes) - set(registry.values())):
                log(logging.WARNING, "node %d is not in site-nodes: it is sent nothing", nid)
            self.node_of, self.bound = registry, True
            return [nid for nid in registry.values() if nid in nodes]
        if not cfg.sites_bring_data:  # simulation: the server assigns the partitions
            self.node_of, self.bound = dict(enumerate(nodes)), True
            self.num_partitions = len(nodes)
            return nodes
        log(logging.WARNING, "site-nodes is not set: each site's partition-id is its own "
            "claim; a partition claimed by two nodes is refused (bind sites to nodes with "
            "site-nodes)")
        return nodes

    def _config(self, pid: int | None, **values: Any) -> ConfigRecord:
        """An instruction's config: the partition it is for, when the server bound it."""
        if pid is not None and self.bound:
            values.update({"partition-id": pid,
                           "num-partitions": self.num_partitions or len(self.node_of)})
        return ConfigRecord(values)

    def _send(self, messages: list[Message], cfg: RunConfig) -> list[Message]:
        """Push ``messages`` and pull their replies until every one has answered, its node
        went offline (Flower stopped receiving its heartbeats), or ``round-timeout`` passed.

        An error reply that the SuperLink makes (an expired message) comes from the
        SuperLink's own node id; its ``src_node_id`` is set to the node the instruction went
        to, so the failure names that site. A failed pull (e.g. the SuperLink's
        database busy under load) is retried, never taken as a lost reply; a reply lost to a
        transient failure (:func:`transient_failure`) has its instruction sent again, up to
        :data:`RESENDS` times (the site repeats that phase).
        Nodes that went offline are listed in :attr:`offline`.
        """
        self.bytes_down = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        self.bytes_up = {}
        pushed = list(self.grid.push_messages(messages))
        dst_of = dict(zip(pushed, (m.metadata.dst_node_id for m in messages)))
        sent = dict(zip(pushed, messages))
        resends: dict[int, int] = {}
        waiting = {mid for mid in dst_of if mid}
        deadline = time.monotonic() + cfg.round_timeout if cfg.round_timeout else None
        replies: list[Message] = []
        self.offline = set()
        while waiting:
            try:
                pulled = list(self.grid.pull_messages(sorted(waiting)))
                online = set(self.grid.get_node_ids())
            except Exception as err:  # noqa: BLE001 - a busy SuperLink: retry, lose nothing
                log(logging.WARNING, "pulling replies failed (%s: %s); retrying",
                    type(err).__name__, err)
                pulled, online = [], {dst_of[mid] for mid in waiting}
            for reply in pulled:
                mid = reply.metadata.reply_to_message_id
                if mid not in waiting:
                    continue
                if transient_failure(reply) and resends.get(dst_of[mid], 0) < RESENDS:
                    waiting.discard(mid)
                    waiting |= self._resend(sent, dst_of, mid, resends,
                                            reply.error.reason or "")
                    continue
                replies.append(reply)
                if reply.metadata.src_node_id == SUPERLINK_NODE_ID:  # made by the SuperLink
                    reply.metadata.__dict__["_src_node_id"] = dst_of[mid]
                elif reply.metadata.src_node_id != dst_of[mid]:
                    continue  # another node answered: refused downstream; wait for the real one
                waiting.discard(mid)
                self.bytes_up[dst_of[mid]] = message_bytes(reply)
            gone = {mid for mid in waiting if dst_of[mid] not in online}
            for mid in sorted(gone):
                log(logging.WARNING, "node %d went offline (its heartbeats stopped) before "
                    "it replied", dst_of[mid])
                self.offline.add(dst_of[mid])
            waiting -= gone
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_SECONDS)
        return replies

    def _resend(self, sent: dict[str, Message], dst_of: dict[str, int], mid: str,
                resends: dict[int, int], reason: str) -> set[str]:
        """Push the instruction ``mid`` again (its reply was lost); the new message id."""
        nid, old = dst_of[mid], sent[mid]
        resends[nid] = resends.get(nid, 0) + 1
        log(logging.WARNING, "the reply of node %d was lost (%s); sending its instruction "
            "again (%d of %d)", nid, reason.split(".")[0], resends[nid], RESENDS)
        again = Message(old.content, dst_node_id=nid, message_type=old.metadata.message_type)
        self.bytes_down[nid] = self.bytes_down.get(nid, 0) + message_bytes(again)
        new_ids = [m for m in self.grid.push_messages([again]) if m]
        for new in new_ids:
            dst_of[new], sent[new] = nid, again
        return set(new_ids)

    def _traffic(self, result: PhaseResult) -> None:
        """The last :meth:`_send`'s measured bytes, per partition of a known node."""
        pid_of = {nid: pid for pid, nid in self.node_of.items()}
        result.measured = True
        result.bytes_down = {pid_of[n]: b for n, b in self.bytes_down.items() if n in pid_of}
        result.bytes_up = {pid_of[n]: b for n, b in self.bytes_up.items() if n in pid_of}

    def _no_reply(self, nid: int, cfg: RunConfig) -> str:
        """Why node ``nid`` sent no reply in the last :meth:`_send`."""
        if nid in self.offline:
            return "no reply: the node went offline (Flower stopped receiving its heartbeats)"
        return f"no reply within round-timeout={cfg.round_timeout}s"

    def collect_models(self, cfg: RunConfig, init: StateDict) -> PhaseResult:
        """Phase 1, once per run: later methods (``methods``) get the same replies; the nodes
        keep their f_i in node state for every method's ``train.personalize``.
        """
        if self._phase1 is not None:
            log(logging.INFO, "phase 1: reusing the %d client models trained for the first "
                "method", len(self._phase1.replies))
            return self._phase1
        nodes = self._bind(cfg)
        pid_of = {nid: pid for pid, nid in self.node_of.items()} if self.bound else {}
        messages = [Message(RecordDict({"arrays": ArrayRecord(init),
                                        "config": self._config(pid_of.get(nid), phase="train")}),
                            dst_node_id=nid, message_type="train") for nid in nodes]
        self._phase1 = self._train_replies(nodes, self._send(messages, cfg), cfg)
        return self._phase1

    def num_sites(self, cfg: RunConfig) -> int:
        """The nodes a round reaches (``site-nodes`` when set, else every connected node)."""
        return len(self._bind(cfg))

    def train_round(self, cfg: RunConfig, strategy: Any, state: StateDict,
                    server_round: int) -> PhaseResult:
        """One round of a multi-round method, configured by Flower's ``strategy``.

        The strategy's ``configure_train`` samples every connected node and puts
        ``server-round`` (and its own keys: FedProx's ``proximal-mu``, a client-side DP
        wrapper's ``clipping_norm``) into the message config; each node's partition is added
        here. :mod:`fedbicross_flwr.methods.rounds` aggregates the replies with the same
        strategy.
        """
        from fedbicross_flwr.methods.rounds import round_config

        nodes = self._bind(cfg)
        pid_of = {nid: pid for pid, nid in self.node_of.items()} if self.bound else {}
        config = ConfigRecord(round_config(cfg))
        messages = []
        for m in strategy.configure_train(server_round, ArrayRecord(state), config, self.grid):
            nid = m.metadata.dst_node_id
            if nid not in nodes:
                continue  # a node outside site-nodes
            content = RecordDict(dict(m.content.items()))
            content["config"] = self._config(pid_of.get(nid), **dict(m.content["config"]))
            messages.append(Message(content, dst_node_id=nid,
                                    message_type=m.metadata.message_type))
        sampled = sorted(m.metadata.dst_node_id for m in messages)
        return self._train_replies(sampled, self._send(messages, cfg), cfg)

    def _train_replies(self, nodes: list[int], replies: list[Message],
                       cfg: RunConfig) -> PhaseResult:
        """Phase-1 style replies (model, metrics, partition-id) keyed by partition-id."""
        result = PhaseResult(num_partitions=self.num_partitions)
        pid_of = {nid: pid for pid, nid in self.node_of.items()} if self.bound else {}
        claims: dict[int, list[int]] = {}  # unbound: partition-id -> nodes claiming it
        answered = set()
        for message in replies:
            nid = message.metadata.src_node_id
            answered.add(nid)
            expected = pid_of.get(nid)
            try:
                reply = read_reply(message, "train")
            except ReplyError as err:
                result.failures.append(ClientFailure(expected, str(nid), "train", str(err)))
                continue
            if reply.error is not None:
                pid = expected if self.bound else reply.partition_id
                result.failures.append(ClientFailure(pid, str(nid), "train", reply.error))
                continue
            pid, state, metrics = reply.partition_id, reply.state, reply.metrics
            assert pid is not None and state is not None  # read_reply: a train reply has both
            if self.bound and pid != expected:
                result.failures.append(ClientFailure(
                    expected, str(nid), "train",
                    f"spoofed partition-id: node {nid} replied as partition {pid}, but "
                    f"partition {pid} belongs to node {self.node_of.get(pid)} and this node "
                    f"was sent partition {expected}'s instruction; reply refused"))
                continue
            claims.setdefault(pid, []).append(nid)
            result.replies[pid] = ClientReply(pid, state, metrics)
        for pid, claimants in sorted(claims.items()):
            if len(claimants) > 1:  # only without a binding: no node can be trusted with pid
                del result.replies[pid]
                result.failures.append(ClientFailure(
                    pid, ",".join(map(str, claimants)), "train",
                    f"partition-id {pid} claimed by {len(claimants)} nodes {claimants}; all "
                    "refused (bind sites to nodes with site-nodes)"))
            elif not self.bound:
                self.node_of[pid] = claimants[0]
        for nid in sorted(set(nodes) - answered):
            result.failures.append(ClientFailure(pid_of.get(nid), str(nid), "train",
                                                 self._no_reply(nid, cfg)))
        self._traffic(result)
        if self.bound:
            result.partitions = {pid: str(nid) for pid, nid in self.node_of.items()}
            for pid, nid in sorted(self.node_of.items()):
                if nid not in nodes:
                    result.failures.append(ClientFailure(pid, str(nid), "train",
                                                         "node not connected"))
        return result

    def personalize(self, cfg: RunConfig, models: dict[int, StateDict],
                    return_models: bool = False) -> PhaseResult:
        """Phase 3 over the Grid: each partition's model to its node, the metrics back.

        ``return_models`` (a simulation, :mod:`fedbicross_flwr.reports.scoring`): the
        instruction asks for the personalized model too (:data:`~fedbicross_flwr.protocol.
        RETURN_MODEL`), a reply without one is refused, and the models are in the result's
        ``models``; their bytes are not counted in ``bytes_up`` (a deployment never sends
        them, so they are no cost of the method).
        """
        messages, pid_of = [], {}
        ask = {RETURN_MODEL: True} if return_models else {}
        for pid, state in sorted(models.items()):
            nid = self.node_of[pid]
            pid_of[nid] = pid
            messages.append(Message(RecordDict({"arrays": ArrayRecord(state),
                                                "config": self._config(pid, **ask)}),
                                    dst_node_id=nid, message_type="train.personalize"))
        result, scoring_bytes = PhaseResult(), {}
        for message in self._send(messages, cfg):
            nid = message.metadata.src_node_id
            if (found := pid_of.get(nid)) is None:
                continue  # not a node this phase instructed
            pid = found
            try:
                reply = read_reply(message, "train.personalize", with_model=return_models)
            except ReplyError as err:
                result.failures.append(ClientFailure(pid, str(nid), "personalize", str(err)))
                continue
            if reply.error is not None:
                result.failures.append(ClientFailure(pid, str(nid), "personalize",
                                                     reply.error))
                continue
            if reply.partition_id is not None and reply.partition_id != pid:
                result.failures.append(ClientFailure(
                    pid, str(nid), "personalize",
                    f"spoofed partition-id: node {nid} replied as partition "
                    f"{reply.partition_id} to partition {pid}'s model; reply refused"))
                continue
            result.replies[pid] = reply.metrics
            if reply.state is not None:
                result.models[pid] = reply.state
                scoring_bytes[pid] = message_bytes(message.content["arrays"])
        for nid, pid in pid_of.items():
            if pid not in result.replies and not any(f.partition_id == pid
                                                     for f in result.failures):
                result.failures.append(ClientFailure(pid, str(nid), "personalize",
                                                     self._no_reply(nid, cfg)))
        self._traffic(result)
        for pid, n in scoring_bytes.items():
            result.bytes_up[pid] = max(0, result.bytes_up.get(pid, 0) - n)
        return result


__all__ = ["GridTransport", "Reply", "ReplyError", "read_reply"]
