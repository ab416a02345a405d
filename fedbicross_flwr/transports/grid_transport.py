"""The :class:`~fedbicross_flwr.transports.transport.Transport` over Flower's Grid (simulation or deployment).

``train`` (phase 1, or one round of a multi-round method) and ``train.personalize`` (phase 3)
as Flower messages. Results are keyed by partition-id, never by Flower node ids; each
partition is bound to one node, and a reply that claims another node's partition is refused
(see :class:`GridTransport`). :class:`fedbicross_flwr.transports.direct.DirectTransport` is the same
interface as plain function calls.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from fedbicross_flwr.keys.sections import SharedConfig, parse_site_nodes
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.protocol import RETURN_MODEL, PhaseResult, StateDict
from fedbicross_flwr.transports.communication import message_bytes
from fedbicross_flwr.transports.replies import Binding, read_personalized, read_uploads

POLL_SECONDS = 3.0  # between pulls of the replies (as Flower's send_and_receive)
RESENDS = 2  # times an instruction is sent again after a transient failure (below)
# Flower's grid makes this error when a reply's objects cannot be pulled from the SuperLink
# (its object store or sqlite busy under load): the site did answer, its reply is gone.
LOST_REPLY_REASON = "Reply message objects are unavailable"


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


class GridTransport:
    """Phase 1 and phase 3 as Flower messages, each partition bound to one node.

    The binding (:class:`~fedbicross_flwr.transports.replies.Binding`, as a one-shot
    strategy's) is fixed before any instruction is sent: the operator's ``site-nodes``
    (deployment), or, in simulation, the server's own assignment of partitions 0..n-1 to the
    connected nodes (sent with the instructions). Every instruction for partition p goes to p's
    node, and a reply counts for p only if it comes from that node and names p: a node that
    claims another site's partition is refused and cannot displace it. Without ``site-nodes``
    in a deployment (the server holds no dataset) the sites name their own partitions, and a
    partition claimed by two nodes is refused for both. The replies are read as a one-shot
    strategy reads them (:mod:`fedbicross_flwr.transports.replies`).
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.binding: Binding | None = None  # which node holds which partition, once bound
        self._phase1: PhaseResult | None = None  # phase 1's replies, shared by every method
        self.offline: set[int] = set()  # nodes that went offline during the last _send
        self.bytes_down: dict[int, int] = {}  # node -> bytes of the last _send's message to it
        self.bytes_up: dict[int, int] = {}  # node -> bytes of its reply
        self.destinations: dict[str, int] = {}  # message id -> node, of the last _send

    def _wait_for_nodes(self, cfg: SharedConfig) -> list[int]:
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

    def _bind(self, cfg: SharedConfig) -> tuple[Binding, list[int]]:
        """Bind partitions to nodes (once per run; in simulation the server assigns them);
        the binding and the connected nodes to instruct.
        """
        nodes = self._wait_for_nodes(cfg)
        if self.binding is None:
            self.binding, _ = Binding.of(nodes, parse_site_nodes(cfg.site_nodes),
                                         assign=not cfg.sites_bring_data)
        if not self.binding.bound:
            return self.binding, nodes
        return self.binding, [nid for nid in self.binding.node_of.values() if nid in nodes]

    def _config(self, pid: int | None, **values: Any) -> ConfigRecord:
        """An instruction's config: the partition it is for, when the server bound it."""
        assert self.binding is not None
        return ConfigRecord({**values, **self.binding.instruction(pid)})

    def _send(self, messages: list[Message], cfg: SharedConfig) -> list[Message]:
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
        self.destinations = dst_of  # resent instructions are added to it
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
        assert self.binding is not None
        pid_of = self.binding.partition_of()
        result.measured = True
        result.bytes_down = {pid_of[n]: b for n, b in self.bytes_down.items() if n in pid_of}
        result.bytes_up = {pid_of[n]: b for n, b in self.bytes_up.items() if n in pid_of}

    def _no_reply(self, nid: int, *, cfg: SharedConfig) -> str:
        """Why node ``nid`` sent no reply in the last :meth:`_send`."""
        if nid in self.offline:
            return "no reply: the node went offline (Flower stopped receiving its heartbeats)"
        return f"no reply within round-timeout={cfg.round_timeout}s"

    def collect_models(self, cfg: SharedConfig, init: StateDict) -> PhaseResult:
        """Phase 1, once per run: later methods (``methods``) get the same replies; the nodes
        keep their f_i in node state for every method's ``train.personalize``.
        """
        if self._phase1 is not None:
            log(logging.INFO, "phase 1: reusing the %d client models trained for the first "
                "method", len(self._phase1.replies))
            return self._phase1
        binding, nodes = self._bind(cfg)
        pid_of = binding.partition_of()
        messages = [Message(RecordDict({"arrays": ArrayRecord(init),
                                        "config": self._config(pid_of.get(nid), phase="train")}),
                            dst_node_id=nid, message_type="train") for nid in nodes]
        self._phase1 = self._train_replies(messages, cfg)
        return self._phase1

    def num_sites(self, cfg: SharedConfig) -> int:
        """The nodes a round reaches (``site-nodes`` when set, else every connected node)."""
        return len(self._bind(cfg)[1])

    def train_round(self, cfg: SharedConfig, strategy: Any, state: StateDict,
                    server_round: int, config: dict[str, Any]) -> PhaseResult:
        """One round of a multi-round method, configured by Flower's ``strategy``.

        The strategy's ``configure_train`` samples every connected node and puts
        ``server-round`` (and its own keys: FedProx's ``proximal-mu``, a client-side DP
        wrapper's ``clipping_norm``) into the caller's round ``config``; each node's partition
        is added here. The caller (:mod:`fedbicross_flwr.methods.rounds`) aggregates the
        replies with the same strategy.
        """
        binding, nodes = self._bind(cfg)
        pid_of = binding.partition_of()
        messages = []
        for m in strategy.configure_train(server_round, ArrayRecord(state),
                                          ConfigRecord(config), self.grid):
            nid = m.metadata.dst_node_id
            if nid not in nodes:
                continue  # a node outside site-nodes
            content = RecordDict(dict(m.content.items()))
            content["config"] = self._config(pid_of.get(nid), **dict(m.content["config"]))
            messages.append(Message(content, dst_node_id=nid,
                                    message_type=m.metadata.message_type))
        return self._train_replies(messages, cfg)

    def _train_replies(self, messages: list[Message], cfg: SharedConfig) -> PhaseResult:
        """Send a ``train`` round; its replies keyed by partition-id (failures with reasons),
        read by :func:`~fedbicross_flwr.transports.replies.read_uploads`.
        """
        assert self.binding is not None
        replies = self._send(messages, cfg)
        result = read_uploads(replies, self.destinations, self.binding,
                              partial(self._no_reply, cfg=cfg))
        self._traffic(result)
        return result

    def personalize(self, cfg: SharedConfig, models: dict[int, StateDict],
                    return_models: bool = False) -> PhaseResult:
        """Phase 3 over the Grid: each partition's model to its node, the metrics back
        (read by :func:`~fedbicross_flwr.transports.replies.read_personalized`).

        ``return_models`` (a simulation, :mod:`fedbicross_flwr.reports.scoring`): the
        instruction asks for the personalized model too (:data:`~fedbicross_flwr.protocol.
        RETURN_MODEL`), a reply without one is refused, and the models are in the result's
        ``models``; their bytes are not counted in ``bytes_up`` (a deployment never sends
        them, so they are no cost of the method).
        """
        assert self.binding is not None  # phase 1 bound the partitions
        ask = {RETURN_MODEL: True} if return_models else {}
        messages = [Message(RecordDict({"arrays": ArrayRecord(state),
                                        "config": self._config(pid, **ask)}),
                            dst_node_id=self.binding.node_of[pid],
                            message_type="train.personalize")
                    for pid, state in sorted(models.items())]
        result = read_personalized(self._send(messages, cfg), self.destinations, self.binding,
                                   partial(self._no_reply, cfg=cfg), with_model=return_models)
        self._traffic(result)
        for pid, state in result.models.items():  # the scoring copy is no cost of the method
            n = message_bytes(ArrayRecord(state))
            result.bytes_up[pid] = max(0, result.bytes_up.get(pid, 0) - n)
        return result


__all__ = ["GridTransport", "transient_failure"]
