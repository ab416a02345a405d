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
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedbicross_flwr.config.run_config import RunConfig, parse_site_nodes
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.protocol import ClientFailure, ClientReply, PhaseResult, StateDict


def client_error(reply: Message, phase: str, pid: int | None = None) -> ClientFailure | None:
    """The failure a client reported in its ``config`` record (e.g. unusable site data)."""
    config = reply.content["config"] if "config" in reply.content else {}  # type: ignore[var-annotated]
    if "error" not in config:
        return None
    if "partition-id" in config:
        pid = int(config["partition-id"])  # type: ignore[arg-type]
    return ClientFailure(pid, str(reply.metadata.src_node_id), phase,
                         f"client error: {config['error']}")  # type: ignore[str-bytes-safe]


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
        timeout = cfg.round_timeout or None
        return list(self.grid.send_and_receive(messages, timeout=timeout))

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

    def train_round(self, cfg: RunConfig, state: StateDict, server_round: int) -> PhaseResult:
        """One round of fedavg-r / fedprox-r, configured by Flower's built-in FedAvg / FedProx.

        The strategy's ``configure_train`` samples every connected node and puts
        ``server-round`` (and FedProx's ``proximal-mu``) into the message config; the
        round's local epochs and each node's partition are added here. Aggregation happens in
        :mod:`fedbicross_flwr.methods.fedavg` (the same function in both engines).
        """
        from fedbicross_flwr.methods.fedavg import flower_strategy, round_config

        nodes = self._bind(cfg)
        pid_of = {nid: pid for pid, nid in self.node_of.items()} if self.bound else {}
        strategy = flower_strategy(cfg, len(nodes))
        config = ConfigRecord({"local-epochs": round_config(cfg, server_round)["local-epochs"]})
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
        for reply in replies:
            nid = reply.metadata.src_node_id
            answered.add(nid)
            expected = pid_of.get(nid)
            if reply.has_error():
                result.failures.append(ClientFailure(expected, str(nid), "train",
                                                     f"error reply: {reply.error.reason}"))
                continue
            if (failure := client_error(reply, "train")) is not None:
                if self.bound:
                    failure.partition_id = expected
                result.failures.append(failure)
                continue
            try:
                pid = int(reply.content["config"]["partition-id"])  # type: ignore[arg-type]
                state = reply.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
                metrics = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as err:
                result.failures.append(ClientFailure(expected, str(nid), "train",
                                                     f"malformed reply: {err!r}"))
                continue
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
                                                 f"no reply within round-timeout="
                                                 f"{cfg.round_timeout}s"))
        if self.bound:
            result.partitions = {pid: str(nid) for pid, nid in self.node_of.items()}
            for pid, nid in sorted(self.node_of.items()):
                if nid not in nodes:
                    result.failures.append(ClientFailure(pid, str(nid), "train",
                                                         "node not connected"))
        return result

    def personalize(self, cfg: RunConfig, models: dict[int, StateDict]) -> PhaseResult:
        """Phase 3 over the Grid: each partition's model to its node, the metrics back."""
        messages, pid_of = [], {}
        for pid, state in sorted(models.items()):
            nid = self.node_of[pid]
            pid_of[nid] = pid
            messages.append(Message(RecordDict({"arrays": ArrayRecord(state),
                                                "config": self._config(pid)}),
                                    dst_node_id=nid, message_type="train.personalize"))
        result = PhaseResult()
        for reply in self._send(messages, cfg):
            nid = reply.metadata.src_node_id
            pid = pid_of.get(nid)  # type: ignore[assignment]
            if pid is None:
                continue  # not a node this phase instructed
            if reply.has_error():
                result.failures.append(ClientFailure(pid, str(nid), "personalize",
                                                     f"error reply: {reply.error.reason}"))
                continue
            if (failure := client_error(reply, "personalize", pid)) is not None:
                failure.partition_id = pid
                result.failures.append(failure)
                continue
            config = reply.content["config"] if "config" in reply.content else {}  # type: ignore[var-annotated]
            if "partition-id" in config and int(config["partition-id"]) != pid:  # type: ignore[arg-type]
                result.failures.append(ClientFailure(
                    pid, str(nid), "personalize",
                    f"spoofed partition-id: node {nid} replied as partition "  # type: ignore[str-bytes-safe]
                    f"{config['partition-id']} to partition {pid}'s model; reply refused"))
                continue
            result.replies[pid] = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
        for nid, pid in pid_of.items():
            if pid not in result.replies and not any(f.partition_id == pid
                                                     for f in result.failures):
                result.failures.append(ClientFailure(pid, str(nid), "personalize",
                                                     "no reply within round-timeout"))
        return result


__all__ = ["GridTransport", "client_error"]
