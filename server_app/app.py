"""ServerApp: the one-shot protocol over Flower's Grid.

``train`` (phase 1) goes to every node once; the configured server method runs on the
replies; ``train.personalize`` (phase 3) sends each node the model chosen for ITS partition.
Results are keyed by the partition-id the clients report, never by Flower node ids.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedbicross_flwr.config import RunConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.protocol import ClientFailure, ClientReply, PhaseResult, StateDict
from fedbicross_flwr.server import run_server

app = ServerApp()


def client_error(reply: Message, phase: str, pid: int | None = None) -> ClientFailure | None:
    """The failure a client reported in its ``config`` record (e.g. unusable site data)."""
    config = reply.content["config"] if "config" in reply.content else {}
    if "error" not in config:
        return None
    if "partition-id" in config:
        pid = int(config["partition-id"])
    return ClientFailure(pid, str(reply.metadata.src_node_id), phase,
                         f"client error: {config['error']}")


class GridTransport:
    """Phase 1 and phase 3 as Flower messages."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.node_of: dict[int, int] = {}  # partition-id -> node id, learnt in phase 1

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

    def _send(self, messages: list[Message], cfg: RunConfig) -> list[Message]:
        timeout = cfg.round_timeout or None
        return list(self.grid.send_and_receive(messages, timeout=timeout))

    def collect_models(self, cfg: RunConfig, init: StateDict) -> PhaseResult:
        nodes = self._wait_for_nodes(cfg)
        content = RecordDict({"arrays": ArrayRecord(init),
                              "config": ConfigRecord({"phase": "train"})})
        messages = [Message(content, dst_node_id=nid, message_type="train") for nid in nodes]
        return self._train_replies(nodes, self._send(messages, cfg), cfg)

    def train_round(self, cfg: RunConfig, state: StateDict, server_round: int) -> PhaseResult:
        """One round of fedavg-r / fedprox-r, configured by Flower's built-in FedAvg / FedProx.

        The strategy's ``configure_train`` samples every connected node and puts
        ``server-round`` (and FedProx's ``proximal-mu``) into the message config; the
        round's local epochs are added here. Aggregation happens in
        :mod:`fedbicross_flwr.multiround` (the same function in both engines).
        """
        from fedbicross_flwr.multiround import flower_strategy, round_config

        nodes = self._wait_for_nodes(cfg)
        strategy = flower_strategy(cfg, len(nodes))
        config = ConfigRecord({"local-epochs": round_config(cfg, server_round)["local-epochs"]})
        messages = list(strategy.configure_train(server_round, ArrayRecord(state), config,
                                                 self.grid))
        sampled = sorted(m.metadata.dst_node_id for m in messages)
        return self._train_replies(sampled, self._send(messages, cfg), cfg)

    def _train_replies(self, nodes: list[int], replies: list[Message],
                       cfg: RunConfig) -> PhaseResult:
        """Phase-1 style replies (model, metrics, partition-id) keyed by partition-id."""
        result = PhaseResult()
        answered = set()
        for reply in replies:
            nid = reply.metadata.src_node_id
            answered.add(nid)
            if reply.has_error():
                result.failures.append(ClientFailure(None, str(nid), "train",
                                                     f"error reply: {reply.error.reason}"))
                continue
            if (failure := client_error(reply, "train")) is not None:
                result.failures.append(failure)
                continue
            try:
                pid = int(reply.content["config"]["partition-id"])
                state = reply.content["arrays"].to_torch_state_dict()
                metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
            except (KeyError, TypeError, ValueError) as err:
                result.failures.append(ClientFailure(None, str(nid), "train",
                                                     f"malformed reply: {err!r}"))
                continue
            if pid in result.replies:
                result.failures.append(ClientFailure(pid, str(nid), "train",
                                                     "duplicate partition-id"))
                continue
            self.node_of[pid] = nid
            result.replies[pid] = ClientReply(pid, state, metrics)
        for nid in sorted(set(nodes) - answered):
            result.failures.append(ClientFailure(None, str(nid), "train",
                                                 f"no reply within round-timeout="
                                                 f"{cfg.round_timeout}s"))
        return result

    def personalize(self, cfg: RunConfig, models: dict[int, StateDict]) -> PhaseResult:
        messages, pid_of = [], {}
        for pid, state in sorted(models.items()):
            nid = self.node_of[pid]
            pid_of[nid] = pid
            messages.append(Message(RecordDict({"arrays": ArrayRecord(state)}),
                                    dst_node_id=nid, message_type="train.personalize"))
        result = PhaseResult()
        for reply in self._send(messages, cfg):
            nid = reply.metadata.src_node_id
            pid = pid_of.get(nid)
            if reply.has_error():
                result.failures.append(ClientFailure(pid, str(nid), "personalize",
                                                     f"error reply: {reply.error.reason}"))
                continue
            if (failure := client_error(reply, "personalize", pid)) is not None:
                result.failures.append(failure)
                continue
            result.replies[pid] = {k: float(v) for k, v in reply.content["metrics"].items()}
        for nid, pid in pid_of.items():
            if pid not in result.replies and not any(f.partition_id == pid
                                                     for f in result.failures):
                result.failures.append(ClientFailure(pid, str(nid), "personalize",
                                                     "no reply within round-timeout"))
        return result


@app.main()
def main(grid: Grid, context: Context) -> Path:
    """Validate the run config, then run the three phases; returns the run folder."""
    cfg = RunConfig.from_run_config(context.run_config)
    return run_server(cfg, GridTransport(grid))
