"""FedBiCross server side end to end: Stage 1 (clustering, synthesis, noise adaptation) and
Stage 2 (online bi-level cross-cluster KD), i.e. Algorithm 1 lines 1-15.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..distill.noise_adapt import noise_adapted_copy, soft_label_profile, teacher_soft_labels
from ..distill.synthesis import EnsembleTeacher, synthesize_trajectory
from ..distill.utils import derive_seed, model_dtype
from ..logging_utils import StagePlan, keeps_position, log
from ..model import build_resnet18, resnet18_shape, weighted_average
from .bilevel import OnlineBilevelTrainer, fixed_weights
from .checkpoint import StageCheckpoints, fingerprint
from .checkpoint_checks import StageLayout, check_bilevel, check_cluster, check_clustering
from .clustering import (
    cluster_centroids,
    log_clustering,
    noise_predictions,
    similarity_weights,
)
from .clustering_alternatives import assign_clusters
from .config import FedBiCrossSettings
from .stages import EpochRecord, StageRunner, StageTimer

STAGES = ("clustering", "synthesis", "noise_adaptation", "soft_labels", "bilevel")


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
    then per server epoch synthesis and noise adaptation per cluster, and the bi-level KD.
    """
    names = [STAGE_NAMES["1a"]]
    for epoch in range(server_epochs):
        for k in range(num_clusters):
            names += [stage_name("1b", k, epoch, server_epochs),
                      stage_name("1c", k, epoch, server_epochs)]
        names.append(stage_name("2", None, epoch, server_epochs))
    return names


@keeps_position
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
        Builds one cluster model; default: a ``build_resnet18`` of the clients' shape (their
        ``model-width`` included).
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
    # Frozen working copies: callers' models keep their device, mode and requires_grad flags.
    clients = [copy.deepcopy(m).to(device).eval().requires_grad_(False) for m in client_models]
    factory = student_factory or _resnet18_like(client_models[0])
    stages = _stage_runner(checkpoint_dir, s, client_models, in_channels, num_classes,
                           image_size, client_weights, student_factory, device)

    plan = StagePlan(algorithm_stages(s.num_clusters, s.server_epochs))
    layout = StageLayout(s, num_clients, num_classes, in_channels, image_size,
                         model_dtype(clients[0]))  # what a restored checkpoint must hold

    # --- Stage 1a: clustering by output similarity on noise (Algorithm 1, lines 1-3) ----------
    plan.begin(plan.names[0])
    clustering = stages.run("clustering", lambda: cluster_on_noise(clients, s, in_channels,
                                                                 num_classes, image_size,
                                                                 factory, device),
                            timed_as="clustering",
                            check=lambda payload: check_clustering(payload, layout))
    preds, assignment = clustering["preds"], clustering["assignment"]  # (N, M * C), (N,)
    centroids = cluster_centroids(preds, assignment, s.num_clusters)  # (K, M * C)
    members = [[clients[i] for i in np.flatnonzero(assignment == k)] for k in range(s.num_clusters)]

    # --- Stage 2 set-up: G_k^(0), w_k^(0) (Algorithm 1, lines 11-12) ---------------------------
    students = init_cluster_models(factory, s.num_clusters, s.seed, device)
    if s.student_init == "cluster-average":
        _average_into_students(students, clients, assignment, client_weights)
    initial_weights = fixed_weights(
        s.weights_mode, s.num_clusters, similarity_weights(centroids) if s.weights_mode == "similarity" else None
    )
    log(INFO, "Initial cross-cluster weights (%s): %s", s.weights_mode, np.round(initial_weights, 3).tolist())
    trainer = OnlineBilevelTrainer(students, s, initial_weights, device)
    record = stages.resume_epochs(
        s.server_epochs, students, trainer,
        lambda state, epoch: check_bilevel(state, layout, epoch, members, students[0]))

    for epoch in range(record.next_epoch, s.server_epochs):
        _server_epoch(epoch, stages, record, trainer, students, members, layout, device,
                      progress, plan)

    plan.finish()
    return _result(stages, record, clustering, initial_weights, students, s.num_clusters)


def _server_epoch(epoch: int, stages: StageRunner, record: EpochRecord,
                  trainer: OnlineBilevelTrainer, students: list[nn.Module],
                  members: list[list[nn.Module]], layout: StageLayout, device: torch.device,
                  progress: bool, plan: StagePlan) -> None:
    """One server epoch: Stages 1b-1c for every cluster, then Stage 2; checkpointed."""
    s = layout.settings
    # --- Stage 1b-1c per cluster: synthesis with fresh noise, noise-adapted teacher, frozen
    # teachers' soft labels (lines 4-9) ----------------------------------------------------
    carried = record.noise_teachers if s.noise_teacher_carry else []
    clusters = [stages.run(
        f"epoch{epoch}-cluster{k}",
        lambda k=k: _synthesize_cluster(  # type: ignore[misc]
            members[k], s, layout.num_classes, layout.in_channels, layout.image_size, epoch,
            k, device, progress, plan, carried[k] if carried else None),
        check=lambda payload, k=k: check_cluster(payload, layout, members[k]))  # type: ignore[misc]
        for k in range(s.num_clusters)]
    record.add_synthesis(clusters, s.num_examples)
    if s.noise_teacher_carry:  # F~_k continues from this epoch's statistics next epoch
        record.noise_teachers = [c["noise_buffers"] for c in clusters]

    # --- Stage 2: online bi-level cross-cluster KD (lines 13-15) ----------------------------
    plan.begin(stage_name("2", None, epoch, s.server_epochs))
    with stages.timed("bilevel"):
        for kd_pass in range(s.kd_passes):
            tag = f"epoch {epoch + 1}/{s.server_epochs}" + (
                f" pass {kd_pass + 1}/{s.kd_passes}" if s.kd_passes > 1 else "")
            record.histories.append(trainer.run_epoch(
                [c["trajectory"] for c in clusters], [c["teacher_probs"] for c in clusters],
                [c["noise_probs"] for c in clusters], progress=progress, tag=tag, epoch=epoch))
    del clusters  # free the device before the next epoch
    stages.finish_epoch(epoch, s.num_clusters, students, trainer, record)


def _stage_runner(checkpoint_dir: Path | None, s: FedBiCrossSettings,
                  client_models: Sequence[nn.Module], in_channels: int, num_classes: int,
                  image_size: int, client_weights: Sequence[float] | None,
                  student_factory: Callable[[], nn.Module] | None,
                  device: torch.device) -> StageRunner:
    """The resumable stages of one run, its checkpoints keyed by a fingerprint of its inputs."""
    return StageRunner(StageCheckpoints(checkpoint_dir, fingerprint(
        asdict(s), client_models,
        {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
         "client_weights": None if client_weights is None else list(map(float, client_weights)),
         "student": None if student_factory is None else repr(student_factory())})),
        device, STAGES)


def _result(stages: StageRunner, record: EpochRecord, clustering: dict[str, Any],
            initial_weights: np.ndarray, students: list[nn.Module],
            num_clusters: int) -> FedBiCrossResult:
    """The cluster models (CPU copies), the weight history and the run's diagnostics."""
    assignment = clustering["assignment"]
    weight_history = np.concatenate([h["weights"] for h in record.histories])  # (E * T, K, K)
    diagnostics: dict[str, Any] = {
        "stage_times_s": stages.times,
        "cluster_sizes": np.bincount(assignment, minlength=num_clusters).tolist(),
        "degenerate_clients": clustering["degenerate"],
        "initial_weights": initial_weights,
        "final_weights": weight_history[-1],
        "synthesis": record.synthesis,
        "val_loss": np.concatenate([h["val_loss"] for h in record.histories]),
        "source_loss": np.concatenate([h["source_loss"] for h in record.histories]),
    }
    log(INFO, "FedBiCross server done; stage wall times (s): %s",
        {name: round(value, 1) for name, value in stages.times.items()})
    cluster_models = [
        {name: value.detach().cpu().clone() for name, value in student.state_dict().items()}
        for student in students
    ]
    return FedBiCrossResult(cluster_models, assignment, weight_history, record.examples,
                            record.example_labels, diagnostics)


def _resnet18_like(client: nn.Module) -> Callable[[], nn.Module]:
    """Builds ResNet-18s of a client's shape (channels, classes and ``model-width``)."""
    in_channels, num_classes, width = resnet18_shape(client.state_dict())
    return lambda: build_resnet18(in_channels, num_classes, width)


def cluster_on_noise(clients: list[nn.Module], s: FedBiCrossSettings, in_channels: int,
                     num_classes: int, image_size: int, factory: Callable[[], nn.Module],
                     device: torch.device) -> dict[str, Any]:
    """Stage 1a (Algorithm 1, lines 1-3): noise predictions, cluster assignment and the
    clients that look degenerate.

    ``clients`` are frozen eval-mode models on ``device``; returns ``preds`` (N, M * C),
    ``assignment`` (N,) and ``degenerate`` (the clients that predict one class on noise).
    """
    preds = noise_predictions(clients, s.noise_samples, in_channels, derive_seed(s.seed, 0),
                              device, image_size=image_size)  # (N, M * C)
    assignment = assign_clusters(s.cluster_on, clients, preds, s.num_clusters, s.seed,
                                 s.kmeans_n_init, factory)
    degenerate = log_clustering(assignment, preds, num_classes)
    return {"preds": preds, "assignment": assignment, "degenerate": degenerate}


def _synthesize_cluster(members: list[nn.Module], s: FedBiCrossSettings, num_classes: int,
                        in_channels: int, image_size: int, epoch: int, k: int,
                        device: torch.device, progress: bool,
                        plan: StagePlan | None = None,
                        noise_start: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
    """Stages 1b-1c for cluster k in server epoch ``epoch``: the trajectory x^(1..T), its
    labels, the frozen teachers' soft labels at temperature tau, and each part's wall time.
    ``plan`` logs the stages' position in the run. ``noise_start`` (``noise-teacher-carry``):
    the members' BN buffers of the previous epoch's noise-adapted teacher, where Eq. 3
    continues from; None starts from the members' own statistics. With
    ``noise-teacher-carry`` the payload keeps the adapted buffers (``noise_buffers``).
    """
    tag = f"epoch {epoch + 1}/{s.server_epochs} cluster {k}"
    timer = StageTimer()
    if plan is not None:
        plan.begin(stage_name("1b", k, epoch, s.server_epochs))
    with timer("synthesis"):  # trajectory synthesis with fresh noise (lines 4-8)
        trajectory, labels, diag = synthesize_trajectory(
            members, num_classes, in_channels, s, derive_seed(s.seed, 3, epoch, k),
            device, image_size=image_size, progress=progress, tag=tag,
        )  # (T, B, C_in, H, W), (B,)
    if plan is not None:
        plan.begin(stage_name("1c", k, epoch, s.server_epochs))
    with timer("noise_adaptation"):  # noise-adapted teacher (line 9)
        start = members if noise_start is None else _with_buffers(members, noise_start)
        adapted = noise_adapted_copy(start, trajectory, s.noise_momentum,
                                     s.noise_teacher_mode, s.precision,
                                     cutoff=s.noise_ema_cutoff, compile_forwards=s.compile_all)
        noise_buffers = [{n: b.detach().cpu().clone() for n, b in m.named_buffers()}
                         for m in adapted] if s.noise_teacher_carry else None
    with timer("soft_labels"):  # teachers are frozen: soft labels for every step, computed once
        teacher = EnsembleTeacher(members, s.ensemble, "eval")
        noise_teacher = EnsembleTeacher(adapted, s.ensemble, s.noise_teacher_mode)
        probs_f = teacher_soft_labels(teacher, trajectory, s.kd_temperature, s.label_chunk,
                                      s.precision, compile_forwards=s.compile_all)  # (T, B, C)
        probs_fn = teacher_soft_labels(noise_teacher, trajectory, s.kd_temperature, s.label_chunk,
                                       s.precision, compile_forwards=s.compile_all)  # (T, B, C)
        del adapted, noise_teacher
    diag["soft_label_profile"] = {"teacher": soft_label_profile(probs_f, labels),
                                  "noise_teacher": soft_label_profile(probs_fn, labels)}
    payload = {"trajectory": trajectory.detach(), "labels": labels, "diag": diag,
               "teacher_probs": probs_f, "noise_probs": probs_fn, "times": timer.times}
    if noise_buffers is not None:
        payload["noise_buffers"] = noise_buffers
    return payload


def _with_buffers(members: list[nn.Module], buffers: list[dict[str, Tensor]]) -> list[nn.Module]:
    """Copies of the members carrying the given buffers (a carried noise-adapted teacher)."""
    if len(buffers) != len(members):
        raise ValueError(f"carried noise teacher has {len(buffers)} members, the cluster "
                         f"{len(members)}")
    copies = []
    for member, state in zip(members, buffers):
        twin = copy.deepcopy(member)
        own = dict(twin.named_buffers())
        if set(own) != set(state):
            raise ValueError("carried noise teacher buffers do not match the member model")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        copies.append(twin)
    return copies


def _average_into_students(students: list[nn.Module], clients: list[nn.Module],
                           assignment: np.ndarray,
                           client_weights: Sequence[float] | None) -> None:
    """``student-init='cluster-average'``: G_k^(0) = the data-size weighted average of cluster
    k's client models (default: equal weights).
    """
    sizes = np.ones(len(clients)) if client_weights is None else np.asarray(client_weights)
    for k, student in enumerate(students):
        idx = np.flatnonzero(assignment == k)
        student.load_state_dict(weighted_average([clients[i].state_dict() for i in idx],
                                                 sizes[idx].tolist()))
