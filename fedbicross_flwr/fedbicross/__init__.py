"""FedBiCross server side (paper Sec. III-A/B) in plain PyTorch: the paper's method alone.

Stage 1: :mod:`.clustering` (K-means on noise predictions); the trajectory DeepInversion
(Eq. 1-2) and the noise-adapted teachers (Eq. 3) it shares with the baselines are in
:mod:`fedbicross_flwr.distill`. Stage 2: :mod:`.bilevel` (online bi-level cross-cluster KD,
Eq. 4-8). :mod:`.losses` holds the teacher schedule (Eq. 5); Stage 3 (Eq. 9) runs on the
client (:mod:`fedbicross_flwr.client`). :func:`run_fedbicross` runs Stages 1-2 end to end
(:mod:`.method`, with :mod:`.stages` and :mod:`.checkpoint` for resumable stages).
:mod:`.config` holds the run-config keys of Stages 1-2 and imports no torch, so this
``__init__`` imports its names lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "InnerStepResult": "bilevel", "OnlineBilevelTrainer": "bilevel",
    "inner_step_and_hypergradient": "bilevel", "outer_update": "bilevel",
    "project_to_simplex": "bilevel", "kmeans_labels": "clustering",
    "noise_predictions": "clustering", "lambda_schedule": "losses",
    "FedBiCrossResult": "method", "run_fedbicross": "method",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (the package imports no torch)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)


__all__ = sorted(_HOMES)
