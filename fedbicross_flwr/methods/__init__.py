"""Registry of server methods: ``name -> function(MethodInput) -> MethodOutput``.

Every method receives the same client uploads and returns one model per client, which then
goes through the same personalization round and the same evaluation.
"""

from __future__ import annotations

from fedbicross_flwr.methods.base import (ClientUpload, MethodInput, MethodOutput, ServerMethod,
                                          StateDict)
from fedbicross_flwr.methods.simple import fedavg1, local

def _fedbicross(inp: MethodInput) -> MethodOutput:
    # imported lazily: the FedBiCross stack (sklearn, matplotlib) is not needed by the others
    from fedbicross_flwr.methods.fedbicross import fedbicross

    return fedbicross(inp)


def _fedavg_r(inp: MethodInput) -> MethodOutput:
    # fedavg-r / fedprox-r: phase 1 is R rounds (fedbicross_flwr.multiround); this averages R
    from fedbicross_flwr.multiround import fedavg_r

    return fedavg_r(inp)


def _central(inp: MethodInput) -> MethodOutput:
    from fedbicross_flwr.central import central

    return central(inp)


def _baseline(module: str, name: str) -> ServerMethod:
    """A registry entry that imports fedbicross_flwr.baselines.<module> only when called."""

    def run(inp: MethodInput) -> MethodOutput:
        from importlib import import_module

        return getattr(import_module(f"fedbicross_flwr.baselines.{module}"), name)(inp)

    run.__name__ = name
    return run


REGISTRY: dict[str, ServerMethod] = {
    "fedavg1": fedavg1,
    "local": local,
    "fedbicross": _fedbicross,
    "fedavg-r": _fedavg_r,
    "fedprox-r": _fedavg_r,
    "central": _central,
    "fedisca": _baseline("fedisca", "fedisca"),
    "dense": _baseline("dense", "dense"),
    "coboosting": _baseline("coboosting", "coboosting"),
    "dafl": _baseline("dafl", "dafl"),
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
