"""The one-shot methods as Flower strategies: drop one into any ServerApp, like ``FedAvg``.

Each is a :class:`flwr.serverapp.strategy.Strategy` whose ``start(grid=...,
initial_arrays=...)`` runs one round (the upload, the server method, the personalization)
and returns Flower's ``Result``; :mod:`.base` says what each step does. The nodes run the
project's ClientApp handlers (``client_app.app.train`` and ``client_app.app.personalize``);
docs/FLOWER.md has a complete ServerApp.

``FedBiCross``     (method ``fedbicross``): each client receives its cluster's G_k (the paper)
``FedAvgOneShot``  (``fedavg1``): the weighted average of the uploads
``ClusterFedAvg``  (``cluster-fedavg``): its cluster's weighted average
``FedISCA``, ``DENSE``, ``CoBoosting``, ``DAFL`` (``fedisca``, ``dense``, ``coboosting``,
``dafl``): one distilled global model
"""

from __future__ import annotations

from fedbicross_flwr.strategies.base import OneShotStrategy
from fedbicross_flwr.strategies.cluster_fedavg import ClusterFedAvg
from fedbicross_flwr.strategies.coboosting import CoBoosting
from fedbicross_flwr.strategies.dafl import DAFL
from fedbicross_flwr.strategies.dense import DENSE
from fedbicross_flwr.strategies.fedavg_oneshot import FedAvgOneShot
from fedbicross_flwr.strategies.fedbicross import FedBiCross
from fedbicross_flwr.strategies.fedisca import FedISCA

STRATEGIES: tuple[type[OneShotStrategy], ...] = (FedBiCross, FedAvgOneShot, ClusterFedAvg,
                                                 FedISCA, DENSE, CoBoosting, DAFL)

__all__ = ["DAFL", "DENSE", "STRATEGIES", "ClusterFedAvg", "CoBoosting", "FedAvgOneShot",
           "FedBiCross", "FedISCA", "OneShotStrategy"]
