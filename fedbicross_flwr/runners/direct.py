"""Run a whole experiment in one process, without Ray or a SuperLink.

The same client functions (:mod:`fedbicross_flwr.client`, over
:class:`~fedbicross_flwr.transports.direct.DirectTransport`) and the same server protocol
(:func:`fedbicross_flwr.server.run_server`) as the Flower app, with clients called one after
the other. This is the path for quick CPU experiments (no Ray start-up) and for a machine
that runs no Flower runtime. Flower's strategy objects are used as in every engine: a
one-shot method's server stage is its strategy's (:mod:`fedbicross_flwr.strategies`), and
a multi-round reference's strategy configures and aggregates its rounds.
"""

from __future__ import annotations

from pathlib import Path

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.server import run_methods, run_server
from fedbicross_flwr.transports.direct import DirectTransport


def run_direct(cfg: RunConfig) -> Path:
    """Run ``cfg`` end to end in this process; returns the run folder."""
    return run_server(cfg, DirectTransport(cfg))


def run_direct_methods(cfg: RunConfig, methods: list[str],
                       cache_dir: Path | None = None) -> dict[str, Path]:
    """Several server methods on the SAME client models (trained once) and partition.

    :func:`fedbicross_flwr.server.run_methods` with in-process clients: each method gets its
    own run folder ``<run-name>-<method>``, and ``<run-name>-comparison`` the table and the
    summary picture (key ``"comparison"`` of the result) when there are two or more.
    """
    return run_methods(cfg.replace(methods=",".join(methods)), DirectTransport(cfg, cache_dir))


__all__ = ["run_direct", "run_direct_methods"]
