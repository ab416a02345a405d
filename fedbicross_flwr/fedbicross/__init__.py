"""FedBiCross server side (paper Sec. III-A/B) in plain PyTorch.

Stage 1: :mod:`.clustering` (K-means on noise predictions), :mod:`.synthesis` (trajectory
DeepInversion, Eq. 1-2), :mod:`.noise_adapt` (noise-adapted teachers, Eq. 3).
Stage 2: :mod:`.bilevel` (online bi-level cross-cluster KD, Eq. 4-8).
:mod:`.losses` also holds the Stage-3 loss (Eq. 9) used by the clients.
:func:`run_fedbicross` runs Stages 1-2 end to end.
"""

from .bilevel import (
    InnerStepResult,
    OnlineBilevelTrainer,
    inner_step_and_hypergradient,
    outer_update,
    project_to_simplex,
)
from .clustering import cluster_clients, noise_predictions
from .losses import (
    BNStatsHook,
    kd_kl,
    kd_loss,
    lambda_schedule,
    personalization_loss,
    tv_loss,
)
from .method import FedBiCrossResult, run_fedbicross
from .noise_adapt import noise_adapted_copy, teacher_soft_labels
from .settings import FedBiCrossSettings, settings_from_config
from .synthesis import EnsembleTeacher, synthesize_trajectory

__all__ = [
    "BNStatsHook",
    "EnsembleTeacher",
    "FedBiCrossResult",
    "FedBiCrossSettings",
    "InnerStepResult",
    "OnlineBilevelTrainer",
    "cluster_clients",
    "inner_step_and_hypergradient",
    "kd_kl",
    "kd_loss",
    "lambda_schedule",
    "noise_adapted_copy",
    "noise_predictions",
    "outer_update",
    "personalization_loss",
    "project_to_simplex",
    "run_fedbicross",
    "settings_from_config",
    "synthesize_trajectory",
    "teacher_soft_labels",
    "tv_loss",
]
