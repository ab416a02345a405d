"""How the server reaches the clients: the :class:`Transport` interface of the protocol.

Flower's Grid in ``server_app`` (simulation or deployment) and plain function calls in
:mod:`fedbicross_flwr.direct` (one process, no Flower) implement it. It lives below the server
and the methods, so both can name it without importing each other.
"""

from __future__ import annotations

from typing import Protocol

from fedbicross_flwr.config import RunConfig
from fedbicross_flwr.protocol import PhaseResult, StateDict


class Transport(Protocol):
    """How the server reaches the clients."""

    def collect_models(self, cfg: RunConfig, init: StateDict) -> PhaseResult:
        """Phase 1: every client trains once from ``init``; replies are ``ClientReply``."""

    def personalize(self, cfg: RunConfig, models: dict[int, StateDict]) -> PhaseResult:
        """Phase 3: send each partition its model; replies are metric dicts."""


__all__ = ["Transport"]
