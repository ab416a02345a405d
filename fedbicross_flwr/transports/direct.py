"""The :class:`~fedbicross_flwr.transports.transport.Transport` as plain function calls.

The same client functions (:mod:`fedbicross_flwr.client`) as the Flower app, with clients
called one after the other in this process, without Ray or a SuperLink (the direct runner,
:mod:`fedbicross_flwr.runners.direct`, runs the server protocol over it). A multi-round
method's Flower strategy configures each round's messages, and each site handles its message
as the ClientApp does (through the ClientApp's mods). A client that raises is reported as a
failure, like a Flower error reply, and the run goes on.
"""

from __future__ import annotations

import logging
import traceback
from functools import partial
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedbicross_flwr.client import (
    dp_clipping_mod,
    received_state,
    run_local_training,
    run_personalization,
)
from fedbicross_flwr.data.datasets import load_dataset
from fedbicross_flwr.data.site import SiteData, site_from_partition
from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.model import build_resnet18, load_resnet18
from fedbicross_flwr.protocol import ClientFailure, ClientReply, PhaseResult, StateDict
from fedbicross_flwr.storage import client_cache
from fedbicross_flwr.training import resolve_device
from fedbicross_flwr.transports.communication import state_bytes
from fedbicross_flwr.transports.task_identity import ensure_task_identity


class DirectTransport:
    """Clients as in-process function calls over the run config's partition."""

    def __init__(self, cfg: SharedConfig, cache_dir: Path | None = None) -> None:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                          cfg.in_channels, cfg.num_classes)
        self.sites: list[SiteData] = [site_from_partition(ds, cfg, pid, cfg.num_clients)
                                      for pid in range(cfg.num_clients)]
        self.shape = (ds.in_channels, ds.num_classes)  # the config may leave them 0
        self.own_models: dict[int, nn.Module] = {}
        # f_i used by personalization: the phase-1 models, or the last round's models of a
        # multi-round method (kept apart, so a later one-shot method still gets phase 1's)
        self.active_own: dict[int, nn.Module] = self.own_models
        self.device = resolve_device(cfg.device)
        self._phase1: PhaseResult | None = None
        self.cache_dir = cache_dir

    def collect_models(self, cfg: SharedConfig, init: StateDict) -> PhaseResult:
        """Train every client once; later calls (other methods) reuse the same uploads."""
        self.active_own = self.own_models
        if self._phase1 is not None:
            log(logging.INFO, "phase 1: reusing the %d client models trained for the first "
                "method", len(self._phase1.replies))
            return self._phase1
        if self.cache_dir is not None:
            cached = client_cache.load(self.cache_dir, cfg, self.shape)
            if cached is not None:
                self._phase1 = self._phase_result()
                for pid, reply in cached["replies"].items():
                    self._phase1.replies[pid] = ClientReply(pid, reply["state"],
                                                            reply["metrics"])
                self._phase1.failures = [ClientFailure(**f) for f in cached["failures"]]
                for pid, state in cached["own"].items():
                    self.own_models[pid] = load_resnet18(state)
                return _formula_traffic(self._phase1, state_bytes(init))
        result = self._phase_result()
        kept = (client_cache.load_clients(self.cache_dir, cfg, self.shape)
                if self.cache_dir is not None
                else {})
        for site in self.sites:
            if site.partition_id in kept:
                model = load_resnet18(kept[site.partition_id]["state"])
                metrics = kept[site.partition_id]["metrics"]
            else:
                try:
                    model, metrics = run_local_training(cfg, site, self.device, init)
                except Exception as err:  # noqa: BLE001 - a failing client must not stop the run
                    result.failures.append(ClientFailure(site.partition_id, "local", "train",
                                                         _reason(err)))
                    continue
                if self.cache_dir is not None:
                    client_cache.save_client(self.cache_dir, cfg, site.partition_id, {
                        "state": model.state_dict(), "metrics": metrics})
            self.own_models[site.partition_id] = model
            result.replies[site.partition_id] = ClientReply(
                site.partition_id, {k: v.detach().clone() for k, v in
                                    model.state_dict().items()}, metrics)
        self._phase1 = _formula_traffic(result, state_bytes(init))
        if self.cache_dir is not None:
            client_cache.save(self.cache_dir, cfg, {  # plain data: loaded weights-only
                "replies": {pid: {"state": r.state, "metrics": r.metrics}
                            for pid, r in result.replies.items()},
                "failures": [vars(f) for f in result.failures],
                "own": {pid: m.state_dict() for pid, m in self.own_models.items()}})
        return result

    def num_sites(self, cfg: SharedConfig) -> int:
        """Every site of the run's partition."""
        return len(self.sites)

    def train_round(self, cfg: SharedConfig, strategy: Any, state: StateDict,
                    server_round: int, config: dict[str, Any]) -> PhaseResult:
        """One round of a multi-round method: Flower's ``strategy`` builds the round's
        messages (``configure_train`` with the caller's round ``config``, over this engine's
        sites as nodes ``pid + 1``); each site trains from the message's arrays with its
        config, through the ClientApp's client-side DP mod
        (:func:`fedbicross_flwr.client.dp_clipping_mod`), and replies with the
        arrays it was sent, trained.
        """
        ensure_task_identity()
        by_node = {s.partition_id + 1: s for s in self.sites}
        messages = strategy.configure_train(server_round, ArrayRecord(state),
                                            ConfigRecord(config), _SiteNodes(sorted(by_node)))
        result, round_own = self._phase_result(), {}
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            site = by_node[msg.metadata.dst_node_id]
            trained: dict[str, nn.Module] = {}
            try:
                context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={},
                                  state=RecordDict(), run_config={})
                reply = dp_clipping_mod(msg, context, partial(self._train_site, cfg, site,
                                                              trained))
                arrays = reply.content.array_records["arrays"].to_torch_state_dict()
                metrics = {k: float(v) for k, v in  # type: ignore[arg-type]
                           reply.content.metric_records["metrics"].items()}
            except Exception as err:  # noqa: BLE001
                result.failures.append(ClientFailure(site.partition_id, "local", "train",
                                                     _reason(err)))
                continue
            round_own[site.partition_id] = trained["model"]
            result.replies[site.partition_id] = ClientReply(site.partition_id, arrays, metrics)
        self.active_own = round_own
        return _formula_traffic(result, state_bytes(state))

    def _train_site(self, cfg: SharedConfig, site: SiteData, trained: dict[str, nn.Module],
                    msg: Any, context: Any) -> Any:
        """What the ClientApp's ``train`` does with a round message, for one in-process site."""
        config = msg.content["config"]
        received = msg.content["arrays"].to_torch_state_dict()
        model, metrics = run_local_training(
            cfg, site, self.device, received_state(received, cfg, site),
            epochs=int(config["local-epochs"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            server_round=int(config["server-round"]))
        trained["model"] = model
        state = model.state_dict()
        return Message(RecordDict({"arrays": ArrayRecord({k: state[k] for k in received}),
                                   "metrics": MetricRecord(dict(metrics))}),  # type: ignore[arg-type]
                       reply_to=msg)

    def _phase_result(self) -> PhaseResult:
        """An empty phase-1 result: every site trains its partition of the run's dataset."""
        return PhaseResult(partitions={s.partition_id: "local" for s in self.sites},
                           num_partitions=len(self.sites))

    def personalize(self, cfg: SharedConfig, models: dict[int, StateDict],
                    return_models: bool = False) -> PhaseResult:
        """Phase 3 on every site: personalize from its model, return the metrics (and, with
        ``return_models``, the personalized models, for the server to score).
        """
        result = PhaseResult()
        for site in self.sites:
            pid = site.partition_id
            if pid not in models:
                continue
            try:
                received = build_resnet18(site.in_channels, site.num_classes, cfg.model_width)
                received.load_state_dict(models[pid])
                personal, metrics = run_personalization(cfg, site, self.active_own[pid],
                                                        received, self.device)
            except Exception as err:  # noqa: BLE001
                result.failures.append(ClientFailure(pid, "local", "personalize",
                                                     _reason(err)))
                continue
            result.replies[pid] = metrics
            if return_models:
                result.models[pid] = personal.state_dict()
        result.bytes_down = {pid: state_bytes(state) for pid, state in models.items()}
        result.bytes_up = {pid: 0 for pid in result.replies}  # metrics only, no arrays
        return result


class _SiteNodes:
    """The direct engine's sites as the node list a strategy's ``configure_train`` samples
    from (it reads nothing else of a Grid).
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _formula_traffic(result: PhaseResult, sent: int) -> PhaseResult:
    """Phase-1 style traffic by formula: ``sent`` bytes to every site, its model back."""
    result.bytes_down = {pid: sent for pid in result.partitions}
    result.bytes_up = {pid: state_bytes(r.state) for pid, r in result.replies.items()}
    return result


def _reason(err: Exception) -> str:
    log(logging.ERROR, "client failed:\n%s", traceback.format_exc())
    return f"{type(err).__name__}: {err}"


__all__ = ["DirectTransport"]
