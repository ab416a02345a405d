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

The project's own run uses the same objects: :func:`strategy_for` builds the strategy of a
run config's one-shot method, and ``fedbicross_flwr.server.run_server`` runs phase 2 through
its :meth:`~.base.OneShotStrategy.aggregate_uploads`, in every engine.
"""

from __future__ import annotations

from fedbicross_flwr.config.run_config import RunConfig
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
BY_METHOD: dict[str, type[OneShotStrategy]] = {cls.method_name: cls for cls in STRATEGIES}


def strategy_for(cfg: RunConfig) -> OneShotStrategy:
    """The strategy of ``cfg.method`` (a one-shot method), built from the whole run config
    (:meth:`~.base.OneShotStrategy.from_run_config`).

    Raises
    ------
    KeyError
        ``cfg.method`` is not a one-shot method (a reference or a multi-round method has no
        one-shot strategy).
    """
    if cfg.method not in BY_METHOD:
        raise KeyError(f"method {cfg.method!r} has no one-shot strategy; the one-shot methods "
                       f"are {sorted(BY_METHOD)}")
    return BY_METHOD[cfg.method].from_run_config(cfg)


__all__ = ["BY_METHOD", "DAFL", "DENSE", "STRATEGIES", "ClusterFedAvg", "CoBoosting",
           "FedAvgOneShot", "FedBiCross", "FedISCA", "OneShotStrategy", "strategy_for"]
