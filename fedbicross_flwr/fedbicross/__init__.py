"""FedBiCross server side (paper Sec. III-A/B) in plain PyTorch: the paper's method alone.

Stage 1: :mod:`.clustering` (K-means on noise predictions); the trajectory DeepInversion
(Eq. 1-2) and the noise-adapted teachers (Eq. 3) it shares with the baselines are in
:mod:`fedbicross_flwr.distill`. Stage 2: :mod:`.bilevel` (online bi-level cross-cluster KD,
Eq. 4-8). :mod:`.losses` holds the teacher schedule (Eq. 5) and the Stage-3 loss (Eq. 9) used
by the clients. :func:`run_fedbicross` runs Stages 1-2 end to end (:mod:`.method`, with
:mod:`.stages` and :mod:`.checkpoint` for resumable stages).
"""

from .bilevel import (
    InnerStepResult,
    OnlineBilevelTrainer,
    inner_step_and_hypergradient,
    outer_update,
    project_to_simplex,
)
from .clustering import cluster_clients, noise_predictions
from .losses import lambda_schedule, personalization_loss
from .method import FedBiCrossResult, run_fedbicross

__all__ = [
    "FedBiCrossResult",
    "InnerStepResult",
    "OnlineBilevelTrainer",
    "cluster_clients",
    "inner_step_and_hypergradient",
    "lambda_schedule",
    "noise_predictions",
    "outer_update",
    "personalization_loss",
    "project_to_simplex",
    "run_fedbicross",
]
