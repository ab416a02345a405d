"""Reference methods: one-shot FedAvg (FedAvg-1) and ``local`` (no federation at all)."""

from __future__ import annotations

import logging

import torch

from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput, StateDict


def weighted_average(states: list[StateDict], weights: list[float]) -> StateDict:
    """Parameter-wise weighted mean of state dicts, BatchNorm buffers included.

    Floating-point tensors are averaged in float64 and cast back; integer buffers
    (``num_batches_tracked``) get the weighted mean rounded to the nearest integer.
    """
    if not states:
        raise ValueError("cannot average zero models")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    out: StateDict = {}
    for key, ref in states[0].items():
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights))
        out[key] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out


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
