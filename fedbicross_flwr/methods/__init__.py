"""The server methods, one module each, listed (torch-free) in :mod:`.catalog`.

Every method receives the same client uploads and returns one model per client, which then
goes through the same personalization round and the same evaluation (:mod:`.base` holds the
contract: :class:`~.base.MethodInput`, :class:`~.base.MethodOutput`).

``fedavg1``                               :mod:`.fedavg` (one-shot FedAvg)
``fedavg-r``, ``fedadam-r``, ``krum-r``,   :mod:`.flower_strategies` (Flower's own strategies,
``dp-fixed-server-r``, ...               R rounds driven by :mod:`.rounds`)
``local``                                 :mod:`.local` (no federation)
``central``                               :mod:`.central` (pooled-data upper bound, simulation)
``fedbicross``                            :mod:`.fedbicross` (glue to the algorithm core)
``fedisca``, ``dense``, ``coboosting``,   :mod:`.baselines` (the paper's data-free baselines)
``dafl``
``cluster-fedavg``                        :mod:`.cluster_fedavg` (FedBiCross's clusters, averaged:
                                          the null row of its server stage)

This package's ``__init__`` imports no torch. A method's function is reached by import, never
by its name: a one-shot method's through its Flower strategy (:mod:`fedbicross_flwr.strategies`),
a multi-round method's (:func:`.rounds.flower_r`) and a reference's
(:data:`fedbicross_flwr.server.REFERENCES`) by the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbicross_flwr.methods.catalog import CATALOG, MethodSpec, method_names, method_spec

if TYPE_CHECKING:
    from pathlib import Path

    from fedbicross_flwr.keys.sections import SharedConfig
    from fedbicross_flwr.protocol import PhaseResult, StateDict
    from fedbicross_flwr.transports.transport import Transport


def collect_uploads(cfg: "SharedConfig", transport: "Transport", init: "StateDict",
                    run_dir: "Path | None" = None) -> "PhaseResult":
    """Phase 1 of ``cfg.method``: one upload per client (``transport.collect_models``), or, for
    a multi-round method, R rounds of ``transport.train_round`` (:func:`.rounds.run_rounds`).
    """
    if method_spec(cfg.method).multiround:
        from fedbicross_flwr.methods.rounds import multi_round, run_rounds

        return run_rounds(multi_round(cfg), transport, init, run_dir)
    return transport.collect_models(cfg, init)


__all__ = ["CATALOG", "MethodSpec", "collect_uploads", "method_names",
           "method_spec"]
