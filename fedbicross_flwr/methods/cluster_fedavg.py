"""``cluster-fedavg``: FedBiCross's clusters, averaged within each cluster; no synthesis, no KD.

The null row of FedBiCross's server stage. It clusters the uploads exactly as FedBiCross does
(Stage 1a with the same settings and seed: predictions on the same M noise images, the same
K-means), then sends each client the data-size weighted parameter average of its cluster's
models (FedAvg-1 within the cluster, BatchNorm buffers included). That average is also
FedBiCross's G_k^(0) under ``student-init = "cluster-average"``, so a FedBiCross run that does
not beat this row gains nothing from its synthesis and bi-level KD (Stages 1b-2).
"""

from __future__ import annotations

import logging

import numpy as np

from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import cluster_on_noise
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput, write_clusters_csv
from fedbicross_flwr.model import load_resnet18, weighted_average


def cluster_fedavg(inp: MethodInput) -> MethodOutput:
    """Cluster as FedBiCross (Stage 1a); each client gets its cluster's FedAvg model."""
    cfg = inp.cfg
    k = min(FedBiCrossSettings.of(cfg).num_clusters, len(inp.uploads))
    settings = FedBiCrossSettings.of(cfg, num_clusters=k)
    clients = [load_resnet18(u.state).to(inp.device).eval().requires_grad_(False)
               for u in inp.uploads]
    clustering = cluster_on_noise(clients, settings, inp.in_channels, inp.num_classes, 28,
                                  inp.new_model, inp.device)
    assignment = np.asarray(clustering["assignment"])  # (N,)
    models, clusters = {}, {}
    for c in range(k):
        members = [u for u, a in zip(inp.uploads, assignment) if a == c]
        if not members:
            continue
        average = weighted_average([u.state for u in members],
                                   [float(u.num_examples) for u in members])
        for u in members:
            models[u.partition_id], clusters[u.partition_id] = average, c
    write_clusters_csv(inp.run_dir, clusters)
    log(logging.INFO, "cluster-fedavg: clusters %s (FedBiCross's Stage 1a, no synthesis)",
        clusters)
    return MethodOutput(models=models, clusters=clusters,
                        diagnostics={"clusters": clusters,
                                     "degenerate-clients": clustering["degenerate"]})
