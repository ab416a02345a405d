"""FedBiCross server side end to end: Stage 1 (clustering, synthesis, noise adaptation) and
Stage 2 (online bi-level cross-cluster KD), i.e. Algorithm 1 lines 1-15.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..logging_utils import StagePlan, log
from ..model import build_resnet18, weighted_average
from .bilevel import OnlineBilevelTrainer, fixed_weights
from .checkpoint import StageCheckpoints, fingerprint
from .clustering_alternatives import assign_clusters
from .clustering import (
    cluster_centroids,
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
        (server_epochs * kd_passes * T, K, K) cross-cluster weights after each step; row k =
        target k.
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


STAGE_NAMES = {"1a": "Stage 1a clustering", "1b": "Stage 1b synthesis",
               "1c": "Stage 1c noise adaptation", "2": "Stage 2 bi-level cross-cluster KD"}


def stage_name(stage: str, cluster: int | None, epoch: int, epochs: int) -> str:
    """``"Stage 1b synthesis, cluster 0"`` (with ``", epoch e/E"`` when E > 1)."""
    name = STAGE_NAMES[stage] + ("" if cluster is None else f", cluster {cluster}")
    return name + (f", epoch {epoch + 1}/{epochs}" if epochs > 1 else "")


def algorithm_stages(num_clusters: int, server_epochs: int) -> list[str]:
    """The stages of Algorithm 1 in the order :func:`run_fedbicross` runs them: clustering,
    then per server epoch synthesis and noise adaptation per cluster, and the bi-level KD."""
    names = [STAGE_NAMES["1a"]]
    for epoch in range(server_epochs):
        for k in range(num_clusters):
            names += [stage_name("1b", k, epoch, server_epochs),
                      stage_name("1c", k, epoch, server_epochs)]
        names.append(stage_name("2", None, epoch, server_epochs))
    return names


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
    checkpoint_dir: Path | None = None,
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
    checkpoint_dir : Path, optional
        Keep resumable checkpoints there (see :mod:`.checkpoint`): after clustering, after each
        cluster's synthesis and after each server epoch. Finished stages found there are
        restored instead of recomputed; a folder made for other inputs raises
        :class:`~.checkpoint.CheckpointMismatch`.

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
    ckpt = StageCheckpoints(checkpoint_dir, fingerprint(
        asdict(s), client_models,
        {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
         "client_weights": None if client_weights is None else list(map(float, client_weights)),
         "student": None if student_factory is None else repr(student_factory())}))

    plan = StagePlan(algorithm_stages(s.num_clusters, s.server_epochs))

    # --- Stage 1a: clustering by output similarity on noise (Algorithm 1, lines 1-3) ----------
    plan.begin(plan.names[0])
    start = time.perf_counter()
    saved = ckpt.load("clustering")
    if saved is None:
        preds = noise_predictions(clients, s.noise_samples, in_channels, derive_seed(s.seed, 0),
                                  device, image_size=image_size)  # (N, M * C)
        assignment = assign_clusters(s.cluster_on, clients, preds, s.num_clusters, s.seed, s.kmeans_n_init,
                                     student_factory or (lambda: build_resnet18(in_channels, num_classes)))
        degenerate = log_clustering(assignment, preds, num_classes)
        ckpt.save("clustering", {"preds": preds, "assignment": assignment, "degenerate": degenerate})
    else:
        preds, assignment, degenerate = saved["preds"], saved["assignment"], saved["degenerate"]
        log(INFO, "clustering restored from checkpoint: %s", assignment.tolist())
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
    first_epoch = 0
    for epoch in reversed(range(s.server_epochs)):  # the latest finished server epoch, if any
        state = ckpt.load(f"epoch{epoch}-bilevel")
        if state is not None:
            for student, weights in zip(students, state["students"]):
                student.load_state_dict(weights)
            trainer.weights = state["weights"].to(device)
            trainer.momentum_buffers = [{name: b.to(device) for name, b in buffers.items()}
                                        for buffers in state["momentum_buffers"]]
            histories, synthesis_diagnostics = state["histories"], state["synthesis"]
            examples, example_labels = state["examples"], state["example_labels"]
            times.update(state["times"])
            first_epoch = epoch + 1
            log(INFO, "server epochs 1..%d restored from checkpoint", first_epoch)
            break

    for epoch in range(first_epoch, s.server_epochs):
        trajectories, teacher_probs, noise_probs, epoch_diag = [], [], [], []
        examples, example_labels = [], []
        for k in range(s.num_clusters):
            tag = f"epoch {epoch + 1}/{s.server_epochs} cluster {k}"
            plan.begin(stage_name("1b", k, epoch, s.server_epochs))
            saved = ckpt.load(f"epoch{epoch}-cluster{k}")
            if saved is not None:
                log(INFO, "%s: synthesis and soft labels restored from checkpoint", tag)
                trajectory, labels, diag = (saved["trajectory"].to(device),
                                            saved["labels"].to(device), saved["diag"])
                probs_f, probs_fn = saved["teacher_probs"].to(device), saved["noise_probs"].to(device)
                for stage in ("synthesis", "noise_adaptation", "soft_labels"):
                    times[stage] += saved["times"][stage]
            else:
                stage_times = {}
                # --- Stage 1b: trajectory synthesis with fresh noise (lines 4-8) -----------------
                start = time.perf_counter()
                trajectory, labels, diag = synthesize_trajectory(
                    members[k], num_classes, in_channels, s, derive_seed(s.seed, 3, epoch, k),
                    device, image_size=image_size, progress=progress, tag=tag,
                )  # (T, B, C_in, H, W), (B,)
                stage_times["synthesis"] = time.perf_counter() - start

                # --- Stage 1c: noise-adapted teacher (line 9) -------------------------------------
                plan.begin(stage_name("1c", k, epoch, s.server_epochs))
                start = time.perf_counter()
                adapted = noise_adapted_copy(members[k], trajectory, s.noise_momentum,
                                             s.noise_teacher_mode, s.mixed_precision,
                                             cutoff=s.noise_cutoff)
                stage_times["noise_adaptation"] = time.perf_counter() - start

                # Teachers are frozen: soft labels at temperature tau for every step, computed once.
                start = time.perf_counter()
                teacher = EnsembleTeacher(members[k], s.ensemble, "eval")
                noise_teacher = EnsembleTeacher(adapted, s.ensemble, s.noise_teacher_mode)
                probs_f = teacher_soft_labels(teacher, trajectory, s.tau, s.label_chunk,
                                              s.mixed_precision)  # (T, B, C)
                probs_fn = teacher_soft_labels(noise_teacher, trajectory, s.tau, s.label_chunk,
                                               s.mixed_precision)  # (T, B, C)
                del adapted, noise_teacher
                stage_times["soft_labels"] = time.perf_counter() - start
                for stage, seconds in stage_times.items():
                    times[stage] += seconds
                ckpt.save(f"epoch{epoch}-cluster{k}", {
                    "trajectory": trajectory.detach().cpu(), "labels": labels.cpu(), "diag": diag,
                    "teacher_probs": probs_f.cpu(), "noise_probs": probs_fn.cpu(),
                    "times": stage_times})
            epoch_diag.append(diag)
            examples.append(trajectory[-1, : s.num_examples].detach().cpu())
            example_labels.append(labels[: s.num_examples].cpu())
            teacher_probs.append(probs_f)
            noise_probs.append(probs_fn)
            trajectories.append(trajectory)
        synthesis_diagnostics.append(epoch_diag)

        # --- Stage 2: online bi-level cross-cluster KD (lines 13-15) ----------------------------
        plan.begin(stage_name("2", None, epoch, s.server_epochs))
        start = time.perf_counter()
        for kd_pass in range(s.kd_passes):
            tag = f"epoch {epoch + 1}/{s.server_epochs}" + (
                f" pass {kd_pass + 1}/{s.kd_passes}" if s.kd_passes > 1 else "")
            histories.append(trainer.run_epoch(trajectories, teacher_probs, noise_probs,
                                               progress=progress, tag=tag))
        times["bilevel"] += time.perf_counter() - start
        del trajectories, teacher_probs, noise_probs  # free the device before the next epoch
        if ckpt.enabled:
            ckpt.save(f"epoch{epoch}-bilevel", {
                "students": [{n: v.detach().cpu().clone() for n, v in st.state_dict().items()}
                             for st in students],
                "weights": trainer.weights.cpu(),
                "momentum_buffers": [{n: b.cpu() for n, b in buffers.items()}
                                     for buffers in trainer.momentum_buffers],
                "histories": histories, "synthesis": synthesis_diagnostics,
                "examples": examples, "example_labels": example_labels, "times": dict(times)})
            # The epoch's synthesis and the previous epoch's state are superseded.
            ckpt.drop([f"epoch{epoch}-cluster{k}" for k in range(s.num_clusters)]
                      + ([f"epoch{epoch - 1}-bilevel"] if epoch else []))

    plan.finish()
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
