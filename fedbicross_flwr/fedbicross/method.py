"""FedBiCross server side end to end: Stage 1 (clustering, synthesis, noise adaptation) and
Stage 2 (online bi-level cross-cluster KD), i.e. Algorithm 1 lines 1-15.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from logging import INFO
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ..logging_utils import log
from torch import Tensor, nn

from ..model import build_resnet18, weighted_average
from .bilevel import OnlineBilevelTrainer, fixed_weights
from .clustering import (
    cluster_centroids,
    cluster_clients,
    log_clustering,
    noise_predictions,
    similarity_weights,
)
from .noise_adapt import noise_adapted_copy, teacher_soft_labels
from .settings import FedBiCrossSettings
from .synthesis import EnsembleTeacher, synthesize_trajectory
from .utils import derive_seed



@dataclass
class FedBiCrossResult:
    """What the server hands to Stage 3 (personalization) and to the reports.

    Attributes
    ----------
    cluster_models : list[dict[str, Tensor]]
        K state dicts of G_k^(T), on CPU.
    assignment : np.ndarray
        (N,) int64 cluster index of each client (clusters numbered by smallest client index).
    weight_history : np.ndarray
        (server_epochs * T, K, K) cross-cluster weights after each step; row k = target k.
    synthetic_examples : list[Tensor]
        K tensors (n, C_in, H, W), a few final images x^(T) of the last epoch, on CPU,
        normalised (mean 0.5, std 0.5).
    synthetic_labels : list[Tensor]
        K tensors (n,), their target labels.
    diagnostics : dict
        Stage wall times, cluster sizes, degenerate clients, per-cluster synthesis diagnostics,
        validation/source KD losses per step, final weights.
    """

    cluster_models: list[dict[str, Tensor]]
    assignment: np.ndarray
    weight_history: np.ndarray
    synthetic_examples: list[Tensor] = field(default_factory=list)
    synthetic_labels: list[Tensor] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)


def init_cluster_models(
    factory: Callable[[], nn.Module], num_clusters: int, seed: int, device: torch.device
) -> list[nn.Module]:
    """G_k^(0), randomly initialised (Algorithm 1, line 11) from seeded, forked RNG state."""
    models = []
    for k in range(num_clusters):
        # fork_rng keeps the caller's global RNG untouched; devices=[] skips the CUDA RNGs.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 1, k))
            models.append(factory().to(device))
    return models


def run_fedbicross(
    client_models: Sequence[nn.Module],
    in_channels: int,
    num_classes: int,
    settings: FedBiCrossSettings,
    device: torch.device | str,
    progress: bool = True,
    student_factory: Callable[[], nn.Module] | None = None,
    image_size: int = 28,
    client_weights: Sequence[float] | None = None,
) -> FedBiCrossResult:
    """Run Stages 1-2 of FedBiCross on the uploaded client models.

    Parameters
    ----------
    client_models : Sequence[nn.Module]
        The N uploaded models f_i (any device; they are copied, never modified).
    in_channels : int
        Image channels.
    num_classes : int
        C.
    settings : FedBiCrossSettings
        Hyper-parameters. ``num_clusters = 1`` is the "w/o Clus" ablation (one ensemble of
        all clients, w = [1]); ``weights_mode`` selects the cross-cluster ablations.
    device : torch.device or str
        Where everything runs (trajectories stay there: about 1.2 GB per RGB cluster at
        T=500, B=256 in fp32).
    progress : bool
        Log progress lines.
    student_factory : callable, optional
        Builds one cluster model; default ``build_resnet18(in_channels, num_classes)``.
    image_size : int
        Height = width of the images.
    client_weights : Sequence[float], optional
        Data sizes of the clients, for ``student_init='cluster-average'`` (default: equal).

    Returns
    -------
    FedBiCrossResult
    """
    device = torch.device(device)
    s = settings
    num_clients = len(client_models)
    if not 1 <= s.num_clusters <= num_clients:
        raise ValueError(f"num_clusters must be in [1, N={num_clients}], got {s.num_clusters}")
    times: dict[str, float] = {
        "clustering": 0.0, "synthesis": 0.0, "noise_adaptation": 0.0, "soft_labels": 0.0,
        "bilevel": 0.0,
    }
    # Frozen working copies: callers' models keep their device, mode and requires_grad flags.
    clients = [copy.deepcopy(m).to(device).eval().requires_grad_(False) for m in client_models]

    # --- Stage 1a: clustering by output similarity on noise (Algorithm 1, lines 1-3) ----------
    start = time.perf_counter()
    preds = noise_predictions(clients, s.noise_samples, in_channels, derive_seed(s.seed, 0), device,
                              image_size=image_size)  # (N, M * C)
    assignment = cluster_clients(preds, s.num_clusters, s.seed, n_init=s.kmeans_n_init)
    degenerate = log_clustering(assignment, preds, num_classes)
    centroids = cluster_centroids(preds, assignment, s.num_clusters)  # (K, M * C)
    members = [[clients[i] for i in np.flatnonzero(assignment == k)] for k in range(s.num_clusters)]
    times["clustering"] = time.perf_counter() - start

    # --- Stage 2 set-up: G_k^(0) random, w_k^(0) (Algorithm 1, lines 11-12) --------------------
    factory = student_factory or (lambda: build_resnet18(in_channels, num_classes))
    students = init_cluster_models(factory, s.num_clusters, s.seed, device)
    if s.student_init == "cluster-average":
        sizes = np.ones(num_clients) if client_weights is None else np.asarray(client_weights)
        for k, student in enumerate(students):
            idx = np.flatnonzero(assignment == k)
            student.load_state_dict(weighted_average([clients[i].state_dict() for i in idx],
                                                   sizes[idx].tolist()))
    initial_weights = fixed_weights(
        s.weights_mode, s.num_clusters, similarity_weights(centroids) if s.weights_mode == "similarity" else None
    )
    log(INFO, "Initial cross-cluster weights (%s): %s", s.weights_mode, np.round(initial_weights, 3).tolist())
    trainer = OnlineBilevelTrainer(students, s, initial_weights, device)

    histories: list[dict[str, np.ndarray]] = []
    synthesis_diagnostics: list[list[dict[str, Any]]] = []
    examples: list[Tensor] = []
    example_labels: list[Tensor] = []
    for epoch in range(s.server_epochs):
        trajectories, teacher_probs, noise_probs, epoch_diag = [], [], [], []
        examples, example_labels = [], []
        for k in range(s.num_clusters):
            tag = f"epoch {epoch + 1}/{s.server_epochs} cluster {k}"
            # --- Stage 1b: trajectory synthesis with fresh noise (lines 4-8) ---------------------
            start = time.perf_counter()
            trajectory, labels, diag = synthesize_trajectory(
                members[k], num_classes, in_channels, s, derive_seed(s.seed, 3, epoch, k), device,
                image_size=image_size, progress=progress, tag=tag,
            )  # (T, B, C_in, H, W), (B,)
            times["synthesis"] += time.perf_counter() - start
            epoch_diag.append(diag)
            examples.append(trajectory[-1, : s.num_examples].detach().cpu())
            example_labels.append(labels[: s.num_examples].cpu())

            # --- Stage 1c: noise-adapted teacher (line 9) -----------------------------------------
            start = time.perf_counter()
            adapted = noise_adapted_copy(members[k], trajectory, s.noise_momentum,
                                         s.noise_teacher_mode, s.mixed_precision)
            times["noise_adaptation"] += time.perf_counter() - start

            # Teachers are frozen: soft labels at temperature tau for every step, computed once.
            start = time.perf_counter()
            teacher = EnsembleTeacher(members[k], s.ensemble, "eval")
            noise_teacher = EnsembleTeacher(adapted, s.ensemble, s.noise_teacher_mode)
            teacher_probs.append(teacher_soft_labels(teacher, trajectory, s.tau, s.label_chunk,
                                                     s.mixed_precision))  # (T, B, C)
            noise_probs.append(teacher_soft_labels(noise_teacher, trajectory, s.tau, s.label_chunk,
                                                   s.mixed_precision))  # (T, B, C)
            del adapted, noise_teacher
            times["soft_labels"] += time.perf_counter() - start
            trajectories.append(trajectory)
        synthesis_diagnostics.append(epoch_diag)

        # --- Stage 2: online bi-level cross-cluster KD (lines 13-15) ----------------------------
        start = time.perf_counter()
        histories.append(trainer.run_epoch(trajectories, teacher_probs, noise_probs,
                                           progress=progress, tag=f"epoch {epoch + 1}/{s.server_epochs}"))
        times["bilevel"] += time.perf_counter() - start
        del trajectories, teacher_probs, noise_probs  # free the device before the next epoch

    weight_history = np.concatenate([h["weights"] for h in histories])  # (E * T, K, K)
    diagnostics: dict[str, Any] = {
        "stage_times_s": times,
        "cluster_sizes": np.bincount(assignment, minlength=s.num_clusters).tolist(),
        "degenerate_clients": degenerate,
        "initial_weights": initial_weights,
        "final_weights": weight_history[-1],
        "synthesis": synthesis_diagnostics,
        "val_loss": np.concatenate([h["val_loss"] for h in histories]),
        "source_loss": np.concatenate([h["source_loss"] for h in histories]),
    }
    log(INFO, "FedBiCross server done; stage wall times (s): %s",
        {name: round(value, 1) for name, value in times.items()})
    cluster_models = [
        {name: value.detach().cpu().clone() for name, value in student.state_dict().items()}
        for student in students
    ]
    return FedBiCrossResult(cluster_models, assignment, weight_history, examples, example_labels,
                            diagnostics)
