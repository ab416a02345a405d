"""Cluster-FedAvg as a Flower strategy: FedBiCross's clusters, averaged within each cluster."""

from __future__ import annotations

from typing import Any

from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.methods.cluster_fedavg import cluster_fedavg
from fedbicross_flwr.strategies.base import OneShotStrategy

S = FedBiCrossSettings  # the clustering defaults are FedBiCross's


class ClusterFedAvg(OneShotStrategy):
    """Cluster-FedAvg: cluster the uploads as FedBiCross does (Stage 1a), then send each
    client the data-size weighted average of its cluster's uploads; no synthesis, no KD (the
    null row of FedBiCross's server stage). ``Result.arrays`` stays empty unless one cluster
    holds every client.

    Parameters
    ----------
    num_clusters : int (default: 2)
        K, the number of client clusters.
    noise_samples : int (default: 256)
        M, the noise images whose predictions cluster the clients.
    cluster_on : str (default: "predictions")
        ``predictions`` (the paper), ``parameters`` or ``hierarchical`` (ablations).
    kmeans_n_init : int (default: 10)
        K-means restarts.
    **kwargs
        The arguments of :class:`~fedbicross_flwr.strategies.base.OneShotStrategy`.
    """

    method_name = "cluster-fedavg"
    extra_keys = ("num_clusters", "noise_samples", "cluster_on", "kmeans_n_init")

    def __init__(self, *, num_clusters: int = S.num_clusters,
                 noise_samples: int = S.noise_samples, cluster_on: str = S.cluster_on,
                 kmeans_n_init: int = S.kmeans_n_init, **kwargs: Any) -> None:
        super().__init__(num_clusters=num_clusters, noise_samples=noise_samples,
                         cluster_on=cluster_on, kmeans_n_init=kmeans_n_init, **kwargs)

    def server_method(self, inp: MethodInput) -> MethodOutput:
        """Each partition gets its cluster's average."""
        return cluster_fedavg(inp)


__all__ = ["ClusterFedAvg"]
