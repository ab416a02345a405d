"""Reference methods: one-shot FedAvg (FedAvg-1) and ``local`` (no federation at all)."""

from __future__ import annotations

import logging

from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.model import weighted_average


def fedavg1(inp: MethodInput) -> MethodOutput:
    """FedAvg with a single round: the data-size weighted average sent to every client."""
    weights = [float(u.num_examples) for u in inp.uploads]
    avg = weighted_average([u.state for u in inp.uploads], weights)
    log(logging.INFO, "fedavg1: averaged %d models with weights %s", len(weights), weights)
    return MethodOutput(models={u.partition_id: avg for u in inp.uploads},
                        clusters={u.partition_id: 0 for u in inp.uploads},
                        diagnostics={"weights": weights})


def local(inp: MethodInput) -> MethodOutput:
    """Each client keeps its own model (the reference every federated method must beat)."""
    return MethodOutput(models={u.partition_id: u.state for u in inp.uploads},
                        clusters={u.partition_id: u.partition_id for u in inp.uploads})
