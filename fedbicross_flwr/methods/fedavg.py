"""FedAvg as server methods: one-shot ``fedavg1`` and the multi-round ``fedavg-r``/``fedprox-r``.

``fedavg1`` sends every client the data-size weighted average of the one-shot uploads.

Users compare one-shot methods against what many rounds buy. ``fedavg-r`` and ``fedprox-r``
replace phase 1 of the one-shot protocol by R communication rounds; everything else is the
same as for every other method: the same clients (partition, ``train`` handler, local SGD
settings), the same personalization round (Eq. 9, with the client's last local model as its
own model f_i) and the same evaluation.

Round r (1..R): the server sends the global model w^(r-1) (w^(0) = the common initial model of
the one-shot protocol) with a config ``{"local-epochs", "server-round", "proximal-mu"}``; each
client trains ``round-epochs`` epochs from it (FedProx adds (mu/2)||w - w^(r-1)||^2 to its
loss) and uploads; the server averages the valid uploads weighted by their training-set size
(FedAvg, BatchNorm buffers included). The average after round R is what every client receives
for personalization; it is computed by the registry method :func:`fedavg_r` (phase 2), so the
uploads of round R go through the same validation as one-shot uploads.

On the Flower Grid (:class:`fedbicross_flwr.engines.grid_transport.GridTransport`), each round's messages are built by Flower's built-in
``flwr.serverapp.strategy.FedAvg`` / ``FedProx`` (``configure_train``: node sampling with
fraction 1.0, ``server-round`` and FedProx's ``proximal-mu`` injected); the in-process runner
builds the same config without Flower. Both engines aggregate with the same function
(:func:`fedbicross_flwr.model.weighted_average`, float64 accumulation), so they give the same
numbers; the tests check it equals Flower's ``FedAvg.aggregate_train`` to float32 precision.

Compute: by default each round trains ceil(local-epochs / R) epochs, so a client's total
training matches the one-shot phase 1 (``round-epochs`` overrides it).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.site import example_bounds
from fedbicross_flwr.engines.communication import add_traffic
from fedbicross_flwr.engines.transport import Transport
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput, StateDict
from fedbicross_flwr.methods.catalog import method_spec
from fedbicross_flwr.model import probe_for, weighted_average
from fedbicross_flwr.protocol import ClientFailure, PhaseResult, upload_problem


def round_epochs(cfg: RunConfig) -> int:
    """Local epochs per round: ``round-epochs``, or ceil(local-epochs / rounds) when 0."""
    return cfg.round_epochs or math.ceil(cfg.local_epochs / cfg.rounds)


def proximal_mu(cfg: RunConfig) -> float:
    """FedProx's mu for ``fedprox-r``; 0 (plain FedAvg) otherwise."""
    return cfg.proximal_mu if cfg.method == "fedprox-r" else 0.0


def round_config(cfg: RunConfig, server_round: int) -> dict[str, Any]:
    """The config a client receives with round ``server_round`` (what Flower's strategy sends)."""
    return {"local-epochs": round_epochs(cfg), "server-round": server_round,
            "proximal-mu": proximal_mu(cfg)}


def flower_strategy(cfg: RunConfig, num_nodes: int) -> Any:
    """Flower's built-in strategy for ``cfg.method``: every connected node trains each round.

    Imported lazily: the one-process runner (e.g. on the GPU machine) works without Flower.
    """
    from flwr.serverapp.strategy import FedAvg, FedProx

    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": num_nodes,
              "min_available_nodes": num_nodes}
    if cfg.method == "fedprox-r":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)  # type: ignore[arg-type]
    return FedAvg(**common)  # type: ignore[arg-type]


def run_rounds(cfg: RunConfig, transport: Transport, init: StateDict,
               run_dir: Path | None = None) -> PhaseResult:
    """Rounds 1..R; returns round R's replies (the uploads phase 2 aggregates).

    Every round's uploads are checked like one-shot uploads (a rejected or missing client is
    left out of that round's average and listed as a failure). ``rounds.csv`` in ``run_dir``
    records, per round, how many clients answered and their mean local accuracies.
    """
    log(logging.INFO, "%s: %d rounds of %d local epochs (%s, proximal-mu=%g)", cfg.method,
        cfg.rounds, round_epochs(cfg), method_spec(cfg.method).strategy, proximal_mu(cfg))
    history: list[dict[str, Any]] = []
    failures: list[ClientFailure] = []
    state = init
    bytes_up: dict[int, int] = {}
    bytes_down: dict[int, int] = {}
    probe, sizes = probe_for(init), None
    for rnd in range(1, cfg.rounds + 1):
        phase = transport.train_round(cfg, state, rnd)
        add_traffic(bytes_up, phase.bytes_up)
        add_traffic(bytes_down, phase.bytes_down)
        if sizes is None:
            sizes = example_bounds(cfg, phase.num_partitions)
        valid = {}
        for pid, reply in sorted(phase.replies.items()):
            problem = upload_problem(reply, init, probe,
                                     cfg.max_num_examples or sizes.get(pid))
            if problem is None:
                valid[pid] = reply
            else:
                log(logging.WARNING, "round %d, partition %d: rejected upload: %s", rnd, pid,
                    problem)
                phase.failures.append(ClientFailure(pid, phase.partitions.get(pid, "-"),
                                                    "train", f"rejected upload: {problem}"))
        history.append(_round_row(rnd, valid, len(phase.failures)))
        if len(valid) < cfg.effective_min_clients:
            raise RuntimeError(f"round {rnd}: only {len(valid)} usable client models, "
                               f"min-clients is {cfg.effective_min_clients}")
        if rnd == cfg.rounds:  # round R's uploads go to phase 2 (validated again there)
            phase.failures = failures + phase.failures
            phase.bytes_up, phase.bytes_down = bytes_up, bytes_down  # all R rounds
            break
        failures += [ClientFailure(f.partition_id, f.node, f"train (round {rnd})", f.reason)
                     for f in phase.failures]
        state = weighted_average([r.state for r in valid.values()],
                                 [r.metrics["num-examples"] for r in valid.values()])
        log(logging.INFO, "round %d/%d: averaged %d client models; mean local test acc %.4f",
            rnd, cfg.rounds, len(valid), history[-1]["mean-test-acc"])
    if run_dir is not None:
        _write_rounds_csv(run_dir / "rounds.csv", history)
    return phase


def _round_row(rnd: int, valid: dict[int, Any], num_failures: int) -> dict[str, Any]:
    def mean(key: str) -> float:
        vals = [r.metrics.get(key, math.nan) for r in valid.values()]
        vals = [v for v in vals if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else math.nan

    return {"round": rnd, "clients": len(valid), "failures": num_failures,
            "mean-train-loss": mean("train-loss"), "mean-val-acc": mean("val-acc"),
            "mean-test-acc": mean("test-acc"), "mean-test-acc-personal": mean("test-acc-personal")}


def _write_rounds_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _average_for_all(inp: MethodInput, diagnostics: dict[str, Any]) -> MethodOutput:
    """FedAvg's aggregation: the data-size weighted average of the uploads, sent to all."""
    weights = [float(u.num_examples) for u in inp.uploads]
    avg = weighted_average([u.state for u in inp.uploads], weights)
    return MethodOutput(models={u.partition_id: avg for u in inp.uploads},
                        clusters={u.partition_id: 0 for u in inp.uploads},
                        diagnostics={**diagnostics, "weights": weights})


def fedavg1(inp: MethodInput) -> MethodOutput:
    """FedAvg with a single round: the data-size weighted average sent to every client."""
    out = _average_for_all(inp, {})
    log(logging.INFO, "fedavg1: averaged %d models with weights %s", len(inp.uploads),
        out.diagnostics["weights"])
    return out


def fedavg_r(inp: MethodInput) -> MethodOutput:
    """Phase 2 of fedavg-r / fedprox-r: FedAvg's aggregation of round R's uploads."""
    cfg = inp.cfg
    log(logging.INFO, "%s: global model after round %d = average of %d client models",
        cfg.method, cfg.rounds, len(inp.uploads))
    return _average_for_all(inp, {"rounds": cfg.rounds, "round-epochs": round_epochs(cfg),
                                  "proximal-mu": proximal_mu(cfg)})
