"""What a client does in each phase (the ClientApp and the direct runner call it).

Phase 1 (``train``): train the local ResNet-18 f_i on the client's partition.
Phase 3 (``train.personalize``): start from the model the server chose for this client
(G_k for FedBiCross), fine-tune it with Eq. 9, report accuracy before and after in both
evaluation views. Only metrics leave the client (and, in a simulation, the personalized model,
which the server scores itself); data and labels never do.

:data:`REPLY_METRICS` is the one list of metric names a client may send in each phase;
:func:`checked_reply_metrics` enforces it (names, count, scalar number values) in the
ClientApp before a reply is built. :func:`dp_clipping_mod` is the ClientApp's one mod (Flower's
client-side DP clipping when a round asks for it). Flower is imported only inside that mod:
the phases themselves run without it.
"""

from __future__ import annotations

import copy
import logging
import numbers
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedbicross_flwr.data.site import SiteData
from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.model import build_resnet18, initial_state, with_counters
from fedbicross_flwr.protocol import CLIPPING_KEY, REPLY_METRICS
from fedbicross_flwr.training import (
    SGDSettings,
    accuracy,
    client_seed,
    evaluate_views,
    predict_logits,
    sgd_epochs,
    train_local,
)

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable


class ReplyMetricsError(ValueError):
    """A client's reply metrics are not exactly the allowed names with scalar number values."""


def checked_reply_metrics(message_type: str, metrics: Mapping[str, object]) -> dict[str, float]:
    """``metrics`` as floats if they are exactly :data:`REPLY_METRICS` of ``message_type``.

    Raises
    ------
    ReplyMetricsError
        A name that is not allowed (e.g. ``label-0``), a missing name, or a value that is not
        a single real number (a list, a string, a bool).
    """
    allowed = REPLY_METRICS.get(message_type)
    if allowed is None:
        raise ReplyMetricsError(f"no reply metrics are allowed for message type "
                                f"{message_type!r}")
    extra, missing = sorted(set(metrics) - allowed), sorted(allowed - set(metrics))
    if extra or missing:
        raise ReplyMetricsError(
            f"{message_type} reply metrics must be exactly {sorted(allowed)}: "
            f"{len(extra)} not allowed {extra[:5]}, missing {missing}")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ReplyMetricsError(f"{message_type} reply metric {name!r} must be one real "
                                    f"number, got {type(value).__name__}")
    return {name: float(value) for name, value in metrics.items()}  # type: ignore[arg-type]


def received_state(received: dict[str, torch.Tensor], cfg: SharedConfig,
                   site: SiteData) -> dict[str, torch.Tensor]:
    """A received model as a full state dict: a round of Flower's strategies sends the
    floating-point arrays only (:func:`fedbicross_flwr.model.float_state`), so BatchNorm's step
    counters are filled in from a fresh model; a full state is returned as it came.
    """
    if any(k.endswith("num_batches_tracked") for k in received):  # phase 1: the whole w^(0)
        return received
    fresh = build_resnet18(site.in_channels, site.num_classes, cfg.model_width).state_dict()
    return with_counters(received, fresh)


def run_local_training(cfg: SharedConfig, site: SiteData, device: torch.device,
                       init: dict[str, torch.Tensor] | None = None,
                       epochs: int | None = None, proximal_mu: float = 0.0,
                       server_round: int = 0) -> tuple[nn.Module, dict[str, float]]:
    """Phase 1: train f_i from the server's initial model ``init`` (or a seeded one).

    The multi-round references (fedavg-r, fedprox-r) call it once per round with the round's
    ``epochs``, FedProx's ``proximal_mu`` and the ``server_round`` (which varies the batch
    order from round to round); the one-shot protocol uses the defaults.
    """
    if site.n_train < 2:
        raise ValueError(f"partition {site.partition_id} has {site.n_train} training samples; "
                         "at least 2 are needed")
    seed = client_seed(cfg, site.partition_id) + 7919 * server_round
    model = build_resnet18(site.in_channels, site.num_classes, cfg.model_width)
    model.load_state_dict(init if init is not None else
                          initial_state(cfg, site.in_channels, site.num_classes))
    opt = SGDSettings(cfg.local_epochs if epochs is None else epochs, cfg.local_lr,
                      cfg.local_momentum, cfg.local_weight_decay, cfg.batch_size, seed)
    start = time.perf_counter()
    history = train_local(model, site.x_train, site.y_train, opt, device, cfg.precision,
                          desc=f"[client {site.partition_id}]", progress=cfg.progress,
                          proximal_mu=proximal_mu)
    metrics = {
        "num-examples": float(site.n_train),
        "train-loss": history[-1] if history else float("nan"),
        "val-acc": accuracy(model, site.x_val, site.y_val, device, cfg.eval_precision),
        **evaluate_views(model, site, device, cfg.eval_precision),
        "n-test": float(len(site.y_test)),
        "n-test-personal": float(len(site.y_test_personal)),
        "train-seconds": time.perf_counter() - start,
    }
    log(logging.INFO, "[client %d] trained on %d samples (classes %s): val %.3f, test %.3f, "
        "personal test %.3f", site.partition_id, site.n_train, site.label_histogram(),
        metrics["val-acc"], metrics["test-acc"], metrics["test-acc-personal"])
    model.cpu()
    return model, metrics


def personalization_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cluster_logits: torch.Tensor,
    own_logits: torch.Tensor,
    gamma: float,
    delta: float,
) -> torch.Tensor:
    """Personalized distillation loss of Eq. 9 (Stage 3, run by the client).

    L_pers = CE(f_pers(x), y) + gamma * KL(G_k(x) || f_pers(x)) + delta * KL(f_i(x) || f_pers(x)),
    all at temperature 1 (the paper gives no temperature for Eq. 9), KL batch-mean. G_k (the
    cluster model) and f_i (the client's own uploaded model) are frozen teachers: their logits
    are detached here.

    Parameters
    ----------
    logits : torch.Tensor
        (B, C) logits of f_pers.
    labels : torch.Tensor
        (B,) int64 class labels.
    cluster_logits : torch.Tensor
        (B, C) logits of G_k^(T).
    own_logits : torch.Tensor
        (B, C) logits of the client's own model f_i.
    gamma, delta : float
        Weights (paper: 0.5 and 0.3).

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    log_q = F.log_softmax(logits, dim=1)  # (B, C)
    ce = F.nll_loss(log_q, labels)
    kl_cluster = F.kl_div(log_q, F.softmax(cluster_logits.detach(), dim=1), reduction="batchmean")
    kl_own = F.kl_div(log_q, F.softmax(own_logits.detach(), dim=1), reduction="batchmean")
    return ce + gamma * kl_cluster + delta * kl_own


def personalize(student: nn.Module, cluster_model: nn.Module, own_model: nn.Module,
                x: torch.Tensor, y: torch.Tensor, opt: SGDSettings, gamma: float,
                delta: float, device: torch.device, precision: str = "fp32",
                desc: str = "", progress: bool = True) -> list[float]:
    """Personalized distillation, Eq. 9, on the client's own data.

    ``student`` starts as a copy of the received model G_k (the caller copies it); the loss is
    CE(f_pers(x), y) + gamma * KL(G_k(x) || f_pers(x)) + delta * KL(f_i(x) || f_pers(x)).
    The two teachers are frozen: their outputs on the whole local set are computed once.
    """
    cluster_logits = predict_logits(cluster_model, x, device).to(device)  # (n, C)
    own_logits = predict_logits(own_model, x, device).to(device)  # (n, C)
    y_dev = y.to(device)

    def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return personalization_loss(logits, y_dev[idx], cluster_logits[idx], own_logits[idx],
                                    gamma, delta)

    return sgd_epochs(student, x, y, opt, loss_fn, device, precision,
                      f"{desc} personalize", progress)


def run_personalization(cfg: SharedConfig, site: SiteData, own_model: nn.Module,
                        received: nn.Module, device: torch.device
                        ) -> tuple[nn.Module, dict[str, float]]:
    """Phase 3: Eq. 9 from the received model; metrics before and after, both views."""
    before = evaluate_views(received, site, device, cfg.eval_precision, shared=True)
    metrics = {"acc-before": before["test-acc"],
               "acc-personal-before": before["test-acc-personal"],
               "val-acc-before": accuracy(received, site.x_val, site.y_val, device,
                                          cfg.eval_precision)}
    student = copy.deepcopy(received)
    if cfg.pers_epochs > 0:
        seed = client_seed(cfg, site.partition_id) + 7
        opt = SGDSettings(cfg.pers_epochs, cfg.pers_lr, cfg.local_momentum,
                          cfg.local_weight_decay, cfg.batch_size, seed)
        personalize(student, received, own_model, site.x_train, site.y_train, opt,
                    cfg.pers_gamma, cfg.pers_delta, device, cfg.precision,
                    desc=f"[client {site.partition_id}]", progress=cfg.progress)
    after = evaluate_views(student, site, device, cfg.eval_precision)
    metrics.update({"acc-after": after["test-acc"],
                    "acc-personal-after": after["test-acc-personal"],
                    "val-acc-after": accuracy(student, site.x_val, site.y_val, device,
                                              cfg.eval_precision),
                    "num-examples": float(site.n_train)})
    log(logging.INFO, "[client %d] personalized: official test %.3f -> %.3f, personal test "
        "%.3f -> %.3f", site.partition_id, metrics["acc-before"], metrics["acc-after"],
        metrics["acc-personal-before"], metrics["acc-personal-after"])
    student.cpu()
    return student, metrics


def dp_clipping_mod(msg: "Message", context: "Context",
                    call_next: "ClientAppCallable") -> "Message":
    """ClientApp mod: Flower's client-side DP clipping when the round asks for it.

    A ``train`` message whose config carries ``dp-clipping`` goes through Flower's
    ``fixedclipping_mod`` or ``adaptiveclipping_mod``; every other message passes unchanged.
    """
    config = msg.content["config"] if "config" in msg.content else None
    mode = config.get(CLIPPING_KEY) if config is not None else None  # type: ignore[union-attr]
    if msg.metadata.message_type != "train" or mode is None:
        return call_next(msg, context)
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mod = fixedclipping_mod if mode == "fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)
