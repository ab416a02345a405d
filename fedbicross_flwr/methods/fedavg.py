"""FedAvg-1 as a server method: the data-size weighted average of the one-shot uploads, sent
to every client (one round of FedAvg, BatchNorm buffers included).

The multi-round FedAvg (``fedavg-r``) and Flower's other strategies are in
:mod:`.flower_strategies` and :mod:`.rounds`; their aggregation is Flower's own.
"""

from __future__ import annotations

import logging

from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.model import weighted_average


def fedavg1(inp: MethodInput) -> MethodOutput:
    """FedAvg with a single round: the data-size weighted average sent to every client."""
    weights = [float(u.num_examples) for u in inp.uploads]
    avg = weighted_average([u.state for u in inp.uploads], weights)
    log(logging.INFO, "fedavg1: averaged %d models with weights %s", len(inp.uploads), weights)
    return MethodOutput(models={u.partition_id: avg for u in inp.uploads},
                        clusters={u.partition_id: 0 for u in inp.uploads},
                        diagnostics={"weights": weights})
