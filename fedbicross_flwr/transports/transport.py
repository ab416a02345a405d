"""How the server reaches the clients: the :class:`Transport` interface of the protocol.

Flower's Grid (:class:`fedbicross_flwr.transports.grid_transport.GridTransport`, simulation or
deployment) and plain function calls (:class:`fedbicross_flwr.transports.direct.DirectTransport`, one
process, no Flower runtime) implement it. It lives below the server
and the methods, so both can name it without importing each other.
"""

from __future__ import annotations

from typing import Any, Protocol

from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.protocol import PhaseResult, StateDict


class Transport(Protocol):
    """How the server reaches the clients."""

    def collect_models(self, cfg: SharedConfig, init: StateDict) -> PhaseResult:
        """Phase 1: every client trains once from ``init``; replies are ``ClientReply``."""

    def num_sites(self, cfg: SharedConfig) -> int:
        """How many sites a round reaches (every one of them trains each round)."""

    def train_round(self, cfg: SharedConfig, strategy: Any, state: StateDict,
                    server_round: int, config: dict[str, Any]) -> PhaseResult:
        """Round ``server_round`` of a multi-round method (its phase 1 is R of them): Flower's
        ``strategy`` configures the round from the global model ``state`` (its floating-point
        entries) and the caller's round ``config`` (``local-epochs``, and the client-side DP
        clipping key when the method asks for it), and every client trains from it; replies
        are ``ClientReply`` (the arrays the client was sent, trained).
        """

    def personalize(self, cfg: SharedConfig, models: dict[int, StateDict],
                    return_models: bool = False) -> PhaseResult:
        """Phase 3: send each partition its model; replies are metric dicts. With
        ``return_models`` (a simulation: the server scores them) the result's ``models``
        holds each site's personalized model, not counted in ``bytes_up``.
        """


__all__ = ["Transport"]
