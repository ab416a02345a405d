"""The multi-round references: R rounds driven by Flower's own strategy object.

Users compare one-shot methods against what many rounds buy. A multi-round method
(:mod:`.flower_strategies`: ``fedavg-r``, ``fedadam-r``, ``krum-r``, the DP wrappers, ...)
replaces phase 1 of the one-shot protocol by R communication rounds; everything else is the
same as for every other method: the same clients (partition, ``train`` handler, local SGD
settings), the same personalization round (Eq. 9, with the client's last local model as its
own model f_i) and the same evaluation.

Round r (1..R), in every engine:

1. the strategy's ``configure_train(r, w^(r-1), {"local-epochs"}, grid)`` builds the round's
   messages (w^(0) = the common initial model of the one-shot protocol; FedProx adds
   ``proximal-mu``, the client-side DP wrappers ``clipping_norm``);
2. the transport delivers them: each client trains ``round-epochs`` epochs from w^(r-1) and
   replies with its model (FedProx adds (mu/2)||w - w^(r-1)||^2 to its loss; a client-side DP
   site clips its update with Flower's mod);
3. every reply is checked like a one-shot upload; the valid ones go to the strategy's
   ``aggregate_train(r, replies)``, whose result is w^(r). It is checked too: a strategy whose
   aggregate is no usable model (e.g. DP noise that makes a BatchNorm variance negative)
   stops the run with the reason.

The models travel without BatchNorm's integer step counters
(:func:`fedbicross_flwr.model.float_state`). w^(R) is what every client receives for
personalization (:func:`flower_r`, phase 2). Flower's DP wrappers draw their noise from
NumPy's global generator, which is seeded with ``seed`` before round 1.

Compute: by default each round trains ceil(local-epochs / R) epochs, so a client's total
training matches the one-shot phase 1 (``round-epochs`` overrides it).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedbicross_flwr.data.site import example_bounds
from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput, StateDict
from fedbicross_flwr.methods.flower_strategies import (
    BY_METHOD,
    MultiRoundRunConfig,
    build_strategy,
)
from fedbicross_flwr.model import float_state, probe_for, with_counters
from fedbicross_flwr.protocol import (
    ADAPTIVE_CLIPPING_METRICS,
    CLIPPING_KEY,
    ClientFailure,
    ClientReply,
    PhaseResult,
    upload_problem,
    validate_upload,
)
from fedbicross_flwr.storage.atomic import open_text
from fedbicross_flwr.transports.communication import add_traffic
from fedbicross_flwr.transports.task_identity import ensure_task_identity
from fedbicross_flwr.transports.transport import Transport


class RoundError(RuntimeError):
    """A round that cannot go on: too few usable uploads, or an unusable aggregate."""


def multi_round(cfg: SharedConfig) -> MultiRoundRunConfig:
    """``cfg`` as a multi-round run's config; a config without the multi-round keys is refused
    (their defaults are never assumed).
    """
    if not isinstance(cfg, MultiRoundRunConfig):
        raise TypeError(f"{cfg.method} is a multi-round method: its run needs the multi-round "
                        f"keys (a RunConfig), got a {type(cfg).__name__}")
    return cfg


def round_epochs(cfg: MultiRoundRunConfig) -> int:
    """Local epochs per round: ``round-epochs``, or ceil(local-epochs / rounds) when 0."""
    return cfg.round_epochs or math.ceil(cfg.local_epochs / cfg.rounds)


def reply_optional_metrics(cfg: MultiRoundRunConfig) -> frozenset[str]:
    """The metrics a train reply of ``cfg.method`` may add to :data:`~fedbicross_flwr.protocol.
    REPLY_METRICS`: ``norm_bit`` in a client-side adaptive DP wrapper's rounds, else none.
    """
    entry = BY_METHOD.get(cfg.method)
    adaptive = entry is not None and entry.client_clipping == "adaptive"
    return ADAPTIVE_CLIPPING_METRICS if adaptive else frozenset()


def round_config(cfg: MultiRoundRunConfig) -> dict[str, Any]:
    """The config the server hands the strategy's ``configure_train`` each round (the
    strategy adds ``server-round``, and its own keys).
    """
    config: dict[str, Any] = {"local-epochs": round_epochs(cfg)}
    clipping = BY_METHOD[cfg.method].client_clipping
    if clipping is not None:
        config[CLIPPING_KEY] = clipping
    return config


def run_rounds(cfg: MultiRoundRunConfig, transport: Transport, init: StateDict,
               run_dir: Path | None = None) -> PhaseResult:
    """Rounds 1..R; returns round R's replies, with w^(R) as ``global_state``.

    Every round's uploads are checked like one-shot uploads (a rejected or missing client is
    left out of that round's aggregate and listed as a failure). ``rounds.csv`` in ``run_dir``
    records, per round, how many clients answered and their mean local accuracies.

    Raises
    ------
    RoundError
        A round with fewer usable uploads than ``min-clients``, or an aggregate that is not a
        usable model.
    """
    strategy = build_strategy(cfg, transport.num_sites(cfg))
    log(logging.INFO, "%s: %d rounds of %d local epochs, aggregated by Flower's %s",
        cfg.method, cfg.rounds, round_epochs(cfg), BY_METHOD[cfg.method].cls)
    np.random.seed(cfg.seed)  # Flower's DP noise (add_gaussian_noise_inplace)
    history: list[dict[str, Any]] = []
    failures: list[ClientFailure] = []
    bytes_up: dict[int, int] = {}
    bytes_down: dict[int, int] = {}
    state, probe, sizes = init, probe_for(init), None
    for rnd in range(1, cfg.rounds + 1):
        phase = transport.train_round(cfg, strategy, float_state(state), rnd,
                                      round_config(cfg))
        add_traffic(bytes_up, phase.bytes_up)
        add_traffic(bytes_down, phase.bytes_down)
        sizes = sizes or example_bounds(cfg, phase.num_partitions)
        valid = _valid_replies(cfg, phase, init, probe, sizes, rnd)
        history.append(_round_row(rnd, valid, len(phase.failures)))
        if len(valid) < cfg.effective_min_clients:
            raise RoundError(f"round {rnd}: only {len(valid)} usable client models, "
                               f"min-clients is {cfg.effective_min_clients}")
        state = _aggregate(strategy, rnd, valid, init, probe)
        log(logging.INFO, "round %d/%d: aggregated %d client models; mean local test acc %.4f",
            rnd, cfg.rounds, len(valid), history[-1]["mean-test-acc"])
        if rnd < cfg.rounds:
            failures += [ClientFailure(f.partition_id, f.node, f"train (round {rnd})",
                                       f.reason) for f in phase.failures]
    if run_dir is not None:
        _write_rounds_csv(run_dir / "rounds.csv", history)
    phase.failures = failures + phase.failures
    phase.bytes_up, phase.bytes_down = bytes_up, bytes_down  # all R rounds
    phase.global_state = state
    return phase


def _valid_replies(cfg: MultiRoundRunConfig, phase: PhaseResult, init: StateDict, probe: Any,
                   sizes: dict[int, int], rnd: int) -> dict[int, ClientReply]:
    """The round's replies that pass the one-shot upload checks (counters from w^(0))."""
    valid = {}
    for pid, reply in sorted(phase.replies.items()):
        reply = ClientReply(pid, with_counters(reply.state, init), reply.metrics)
        problem = upload_problem(reply, init, probe, cfg.max_num_examples or sizes.get(pid),
                                 reply_optional_metrics(cfg))
        if problem is None:
            valid[pid] = reply
            continue
        log(logging.WARNING, "round %d, partition %d: rejected upload: %s", rnd, pid, problem)
        phase.failures.append(ClientFailure(pid, phase.partitions.get(pid, "-"), "train",
                                            f"rejected upload: {problem}"))
    phase.replies = dict(valid)
    return valid


def _aggregate(strategy: Any, rnd: int, valid: dict[int, ClientReply], init: StateDict,
               probe: Any) -> StateDict:
    """w^(rnd): the strategy's ``aggregate_train`` over the valid replies, as w^(0)'s dtypes."""
    ensure_task_identity()
    replies = [Message(RecordDict({"arrays": ArrayRecord(float_state(r.state)),
                                   "metrics": MetricRecord(r.metrics)}),  # type: ignore[arg-type]
                       dst_node_id=pid + 1, message_type="train")
               for pid, r in sorted(valid.items())]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    if arrays is None:
        raise RoundError(f"round {rnd}: {type(strategy).__name__} aggregated no model")
    got = arrays.to_torch_state_dict()
    state = with_counters({k: got[k].to(init[k].dtype) for k in got if k in init}, init)
    problem = validate_upload(state, init, probe)
    if problem is not None:
        hint = ("; the DP noise (std noise_multiplier x clipping_norm / clients) reaches the "
                "BatchNorm statistics too: lower them in strategy-args"
                if hasattr(strategy, "noise_multiplier") else "")
        raise RoundError(f"round {rnd}: {type(strategy).__name__}'s aggregate is not a "
                           f"usable model: {problem}{hint}")
    return state


def _round_row(rnd: int, valid: dict[int, Any], num_failures: int) -> dict[str, Any]:
    def mean(key: str) -> float:
        vals = [r.metrics.get(key, math.nan) for r in valid.values()]
        vals = [v for v in vals if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else math.nan

    return {"round": rnd, "clients": len(valid), "failures": num_failures,
            "mean-train-loss": mean("train-loss"), "mean-val-acc": mean("val-acc"),
            "mean-test-acc": mean("test-acc"), "mean-test-acc-personal": mean("test-acc-personal")}


def _write_rounds_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with open_text(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def flower_r(inp: MethodInput) -> MethodOutput:
    """Phase 2 of a multi-round method: every client receives w^(R), the strategy's
    aggregate of round R.
    """
    cfg = multi_round(inp.cfg)
    if inp.round_model is None:
        raise RuntimeError(f"{cfg.method}: phase 1 returned no global model")
    entry = BY_METHOD[cfg.method]
    log(logging.INFO, "%s: every client receives Flower %s's aggregate of round %d",
        cfg.method, entry.cls, cfg.rounds)
    return MethodOutput(models={u.partition_id: inp.round_model for u in inp.uploads},
                        clusters={u.partition_id: 0 for u in inp.uploads},
                        diagnostics={"rounds": cfg.rounds, "round-epochs": round_epochs(cfg),
                                     "strategy": entry.cls,
                                     "strategy-args": cfg.strategy_args})
