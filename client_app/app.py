"""ClientApp: local training (``train``) and personalized distillation (``train.personalize``).

The client keeps its own trained model f_i in ``context.state`` between the two messages. A
reply carries model arrays, metrics and the partition-id, never data or labels (in phase 3 the
personalized model only when a simulation's server asks for it to score it; a deployment site,
one with a ``data-path`` or an ``output-dir``, keeps it); its metrics
must be exactly the names of ``fedbicross_flwr.client.REPLY_METRICS`` (otherwise the ClientApp
raises, and only Flower's error reply leaves the site). In simulation the partition comes with
the server's instruction (the server binds each partition to the node it sends it to); a
deployment site answers with the partition-id of its node config. A site whose data cannot be
used (missing path, unreadable archive, labels out of range, wrong image size) replies with a
``config`` record holding its partition-id and an ``error`` naming the problem, so the server
logs it by partition and goes on with the other sites.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbicross_flwr.client import (
    checked_reply_metrics,
    dp_clipping_mod,
    received_state,
    run_local_training,
    run_personalization,
)
from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import DataError
from fedbicross_flwr.data.site import assigned_node_config, load_site, site_partition_id
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.model import build_resnet18, load_resnet18
from fedbicross_flwr.protocol import RETURN_MODEL
from fedbicross_flwr.training import resolve_device

# Flower's client-side DP clipping, when a DP wrapper's round asks for it
app = ClientApp(mods=[dp_clipping_mod])
OWN_MODEL = "own-model"


def own_model_path(context: Context) -> Path | None:
    """Where a deployed site also keeps its own model f_i (its node config's output-dir).

    A SuperNode passes the node state from one ClientApp process to the next, but under load
    the state saved after ``train`` was seen to be missing at ``train.personalize`` (flwr
    1.42, loopback test); the copy on the site's disk makes phase 3 independent of that.
    """
    out_dir = str(context.node_config.get("output-dir", ""))
    return Path(out_dir) / f"own-model-run{context.run_id}.pt" if out_dir else None


def _instruction(msg: Message) -> ConfigRecord | dict:
    return msg.content["config"] if "config" in msg.content else {}  # type: ignore[return-value]


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_run_config(context.run_config)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    node_config = assigned_node_config(context.node_config, _instruction(msg))
    return cfg, load_site(cfg, node_config), resolve_device(cfg.device)


def error_reply(msg: Message, context: Context, err: Exception) -> Message:
    """A reply naming why this site cannot take part (no crash, no data, no model)."""
    pid = site_partition_id(assigned_node_config(context.node_config, _instruction(msg)))
    reason = f"{type(err).__name__}: {err}"
    log(logging.ERROR, "[client %s] cannot take part in %s: %s", pid,
        msg.metadata.message_type, reason)
    config = ConfigRecord({"error": reason} if pid is None else
                          {"partition-id": pid, "error": reason})
    return Message(RecordDict({"config": config}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Phase 1: train f_i once and upload it."""
    try:
        cfg, site, device = _setup(msg, context)
    except DataError as err:
        return error_reply(msg, context, err)
    received = (msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content  # type: ignore[union-attr]
                else None)
    init = None if received is None else received_state(received, cfg, site)
    # Multi-round references: the round's epochs, FedProx's mu and the round number come in
    # the message's config (Flower's strategy sends server-round, FedProx proximal-mu);
    # one-shot sends none.
    config = _instruction(msg)
    model, metrics = run_local_training(
        cfg, site, device, init,
        epochs=int(config["local-epochs"]) if "local-epochs" in config else None,  # type: ignore[arg-type]
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        server_round=int(config.get("server-round", 0)))  # type: ignore[arg-type]
    metrics = checked_reply_metrics(msg.metadata.message_type, metrics)  # before any upload
    state = model.state_dict()
    context.state[OWN_MODEL] = ArrayRecord(state)
    if (path := own_model_path(context)) is not None:  # stays at the site
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    sent = state if received is None else {k: state[k] for k in received}  # what came, trained
    content = RecordDict({"arrays": ArrayRecord(sent), "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
                          "config": ConfigRecord({"partition-id": site.partition_id})})
    return Message(content, reply_to=msg)


@app.train("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """Phase 3: Eq. 9 from the received model; report accuracy before and after."""
    try:
        cfg, site, device = _setup(msg, context)
    except DataError as err:
        return error_reply(msg, context, err)
    path = own_model_path(context)
    if OWN_MODEL in context.state:
        own_state = context.state[OWN_MODEL].to_torch_state_dict()  # type: ignore[union-attr]
    elif path is not None and path.is_file():
        log(logging.WARNING, "[client %d] node state has no local model; reading %s",
            site.partition_id, path)
        own_state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise RuntimeError(f"partition {site.partition_id}: no local model in the node state "
                           "(phase 1 did not run on this node in this run)")
    own = load_resnet18(own_state)
    received = build_resnet18(site.in_channels, site.num_classes, cfg.model_width)
    received.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    personal, metrics = run_personalization(cfg, site, own, received, device)
    metrics = checked_reply_metrics(msg.metadata.message_type, metrics)
    out_dir = str(context.node_config.get("output-dir", ""))
    if out_dir:  # deployment: the site keeps its personalized model
        path = Path(out_dir) / f"personalized-run{context.run_id}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(personal.state_dict(), path)
    content = RecordDict({"metrics": MetricRecord(metrics),  # type: ignore[arg-type]
                          "config": ConfigRecord({"partition-id": site.partition_id})})
    if _instruction(msg).get(RETURN_MODEL):
        if out_dir or str(context.node_config.get("data-path", "")):
            log(logging.WARNING, "[client %d] the server asks for the personalized model; a "
                "deployment site keeps it (only a simulation's sites send it back to be "
                "scored)", site.partition_id)
        else:  # simulation: the server scores it on the official test split it holds
            content["arrays"] = ArrayRecord(personal.state_dict())
    return Message(content, reply_to=msg)
