"""The server methods, one module each, and their registry ``name -> function(MethodInput)``.

Every method receives the same client uploads and returns one model per client, which then
goes through the same personalization round and the same evaluation.

``fedavg1``, ``fedavg-r``, ``fedprox-r``  :mod:`.fedavg` (one-shot and multi-round FedAvg/FedProx)
``local``                                 :mod:`.local` (no federation)
``central``                               :mod:`.central` (pooled-data upper bound, simulation)
``fedbicross``                            :mod:`.fedbicross` (glue to the algorithm core)
``fedisca``, ``dense``, ``coboosting``,   :mod:`.baselines` (the paper's data-free baselines)
``dafl``
``cluster-fedavg``                        :mod:`.cluster_fedavg` (FedBiCross's clusters, averaged:
                                          the null row of its server stage)

The heavy methods are imported when first called: the FedBiCross stack (sklearn, matplotlib)
and the baselines are not needed by the others.
"""

from __future__ import annotations

from importlib import import_module

from fedbicross_flwr.methods.base import (ClientUpload, MethodInput, MethodOutput, ServerMethod,
                                          StateDict)
from fedbicross_flwr.methods.fedavg import fedavg1, fedavg_r
from fedbicross_flwr.methods.local import local


def _lazy(module: str, name: str) -> ServerMethod:
    """A registry entry that imports ``fedbicross_flwr.methods.<module>`` only when called."""

    def run(inp: MethodInput) -> MethodOutput:
        return getattr(import_module(f"fedbicross_flwr.methods.{module}"), name)(inp)

    run.__name__ = name
    return run


REGISTRY: dict[str, ServerMethod] = {
    "fedavg1": fedavg1,
    "local": local,
    "fedbicross": _lazy("fedbicross", "fedbicross"),
    "fedavg-r": fedavg_r,  # phase 1 is R rounds (fedavg.run_rounds); this averages round R
    "fedprox-r": fedavg_r,
    "central": _lazy("central", "central"),
    "fedisca": _lazy("baselines.fedisca", "fedisca"),
    "dense": _lazy("baselines.dense", "dense"),
    "coboosting": _lazy("baselines.coboosting", "coboosting"),
    "dafl": _lazy("baselines.dafl", "dafl"),
    "cluster-fedavg": _lazy("cluster_fedavg", "cluster_fedavg"),
}


def register(name: str, fn: ServerMethod) -> None:
    """Add a method (names are unique)."""
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    REGISTRY[name] = fn


def get_method(name: str) -> ServerMethod:
    """Look a method up by name, with the known names in the error."""
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "ClientUpload", "MethodInput", "MethodOutput", "ServerMethod",
           "StateDict", "get_method", "register"]
