"""Stage 1, ensemble teachers and trajectory-based DeepInversion synthesis (Eq. 1-2).

For each cluster k, a batch of N(0, 1) images is optimised with Adam so that the cluster's
ensemble teacher F_k classifies them as balanced target labels, while their BN feature
statistics match the members' running statistics. Every intermediate batch x^(1..T) is kept:
the whole trajectory is the KD training data of Stage 2.
"""

from __future__ import annotations

import math
import time
from logging import INFO
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..logging_utils import Cadence, log, position_text, progress_text
from ..training import autocast
from .config import SynthesisSettings
from .losses import BNStatsHook, tv_loss
from .utils import (
    compiled,
    cpu_generator,
    full_precision,
    model_dtype,
    preserved_modes,
    to_channels_last,
)


class EnsembleTeacher:
    """Frozen ensemble teacher F_k(x) = (1/|C_k|) sum_{i in C_k} f_i(x) (Sec. III-A-1).

    Parameters
    ----------
    members : Sequence[nn.Module]
        Client models of the cluster. They are put in the requested BN mode at every call.
    ensemble : str
        'prob': average of member probabilities (the paper's formula, default);
        'logit': softmax of the averaged member logits (FedISCA's code).
    bn_mode : str
        'eval': members use their running BN statistics (normal teacher, and the paper's
        noise-adapted teacher); 'train': BN layers use per-batch statistics (FedISCA's
        noise-adapted teacher); every other layer stays in eval mode.
    """

    def __init__(
        self, members: Sequence[nn.Module], ensemble: str = "prob", bn_mode: str = "eval"
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if ensemble not in ("prob", "logit"):
            raise ValueError(f"ensemble must be 'prob' or 'logit', got {ensemble!r}")
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        self.members = list(members)
        self.ensemble = ensemble
        self.bn_mode = bn_mode

    def set_modes(self) -> None:
        """Put every member in eval mode, except BN layers when ``bn_mode == 'train'``."""
        for member in self.members:
            member.eval()
            if self.bn_mode == "train":
                for module in member.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.train()

    def log_probs(self, x: Tensor, tau: float = 1.0) -> Tensor:
        """Log F(x) at temperature tau.

        Parameters
        ----------
        x : Tensor
            (B, C_in, H, W) images.
        tau : float
            Temperature applied to each member's logits.

        Returns
        -------
        Tensor
            (B, C) log-probabilities (differentiable w.r.t. x).
        """
        self.set_modes()
        logits = torch.stack([full_precision(m(x)) for m in self.members])  # (n, B, C)
        if self.ensemble == "logit":
            return F.log_softmax(logits.mean(dim=0) / tau, dim=1)
        # log mean_i softmax(l_i / tau), computed stably in log space.
        log_p = F.log_softmax(logits / tau, dim=2)  # (n, B, C)
        return torch.logsumexp(log_p, dim=0) - math.log(len(self.members))

    def probs(self, x: Tensor, tau: float = 1.0) -> Tensor:
        """F(x) at temperature tau, (B, C)."""
        return self.log_probs(x, tau).exp()


def balanced_labels(batch_size: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """(B,) int64 labels, round-robin over classes (counts differ by at most 1), shuffled."""
    labels = torch.arange(batch_size) % num_classes  # (B,)
    return labels[torch.randperm(batch_size, generator=generator)]


def synthesis_start(
    num_classes: int,
    in_channels: int,
    settings: SynthesisSettings,
    seed: int,
    image_size: int = 28,
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Seeded start of a synthesis run, drawn on CPU so it is the same on every device.

    The labels, x^(0) and the jitter offsets; not the initial model state w^(0), which is
    :func:`fedbicross_flwr.model.initial_state`.

    Returns
    -------
    labels : Tensor
        (B,) int64 balanced target labels y.
    x0 : Tensor
        (B, C_in, H, W) float32 N(0, 1) images x^(0).
    offsets : list[tuple[int, int]]
        T roll offsets (dy, dx), uniform in [-jitter, jitter].
    """
    generator = cpu_generator(seed)
    labels = balanced_labels(settings.synth_batch, num_classes, generator)  # (B,)
    x0 = torch.randn((settings.synth_batch, in_channels, image_size, image_size), generator=generator)
    offsets = torch.randint(-settings.jitter, settings.jitter + 1, (settings.synth_steps, 2),
                            generator=generator)  # (T, 2)
    return labels, x0, [(int(dy), int(dx)) for dy, dx in offsets.tolist()]


def loss_members(members: Sequence[nn.Module], settings: SynthesisSettings) -> list[nn.Module]:
    """The members as the L_DI forwards call them: ``torch.compile`` wrappers when
    ``settings.compile``, else the members themselves.

    The wrappers share the members' parameters and BN submodules (so :class:`BNStatsHook`
    registered on the members still fires) and forward ``eval()``/``train()`` to them. Members
    of one architecture share one compiled graph (parameters are graph inputs), so the compile
    cost is paid once per process and shape, not per member.
    """
    return [compiled(member, settings.compile) for member in members]


def deepinversion_loss(
    teacher: EnsembleTeacher,
    bn_hook: BNStatsHook,
    x_jit: Tensor,
    labels: Tensor,
    settings: SynthesisSettings,
) -> tuple[Tensor, Tensor]:
    """L_DI of Eq. 2 on jittered images: one forward pass of every member of the ensemble.

    Parameters
    ----------
    teacher : EnsembleTeacher
        F_k in eval mode; its members carry the hooks of ``bn_hook``.
    bn_hook : BNStatsHook
        Registered on the members; reset here.
    x_jit : Tensor
        (B, C_in, H, W) jittered images (requires grad).
    labels : Tensor
        (B,) target labels y.
    settings : SynthesisSettings
        Uses tv_weight, bn_weight, bn_reduction, precision.

    Returns
    -------
    loss : Tensor
        Scalar L_DI (differentiable w.r.t. the images).
    terms : Tensor
        (3,) detached unweighted CE, R_BN, R_TV.
    """
    bn_hook.reset()
    with autocast(x_jit.device, settings.precision):
        log_p = teacher.log_probs(x_jit)  # (B, C)
    ce = F.nll_loss(log_p, labels)
    r_bn = bn_hook.loss(settings.bn_reduction)
    r_tv = tv_loss(x_jit)
    loss = ce + settings.tv_weight * r_tv + settings.bn_weight * r_bn
    return loss, torch.stack([ce.detach(), r_bn.detach(), r_tv.detach()])


def synthesize_trajectory(
    members: Sequence[nn.Module],
    num_classes: int,
    in_channels: int,
    settings: SynthesisSettings,
    seed: int,
    device: torch.device | str,
    image_size: int = 28,
    progress: bool = True,
    tag: str = "",
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """DeepInversion with Adam on the input, keeping the whole trajectory (Eq. 1-2).

    At each step t = 1..T, with x_j = roll(x^(t-1)) a random jitter of the current images,

        L_DI = CE(F_k(x_j), y) + alpha_TV * R_TV(x_j) + alpha_BN * R_BN(x_j)      (Eq. 2)

    and x^(t) = Adam step of x^(t-1) on L_DI (Eq. 1 with Adam, lr eta_s). R_BN is summed over the
    BN layers of each member and reduced over members by ``settings.bn_reduction``.

    Parameters
    ----------
    members : Sequence[nn.Module]
        Client models of the cluster, on ``device``; used in eval mode, never updated
        (gradients go to the images only); their train/eval flags are restored afterwards.
    num_classes : int
        C.
    in_channels : int
        Image channels.
    settings : SynthesisSettings
        Uses synth_steps, synth_batch, synth_lr, tv_weight, bn_weight, bn_reduction, ensemble,
        jitter, precision.
    seed : int
        Seed of the initial noise, the label shuffle and the jitter offsets.
    device : torch.device or str
        Where to synthesise; the trajectory stays there.
    image_size : int
        Height = width.
    progress : bool
        Log a line every ~10% of the steps and at least every 30 s.
    tag : str
        Prefix of the log lines (e.g. "epoch 0 cluster 1").

    Returns
    -------
    trajectory : Tensor
        (T, B, C_in, H, W) x^(1..T), the images after each step, on ``device``.
    labels : Tensor
        (B,) int64 target labels y, on ``device``.
    diagnostics : dict
        'ce', 'bn', 'tv': per-step unweighted terms (lists of T floats); 'teacher_accuracy':
        fraction of final images x^(T) that F_k assigns to their target; 'teacher_entropy':
        mean entropy (nats) of F_k on x^(T); 'max_entropy': log C; 'wall_time_s'.
    """
    device = torch.device(device)
    dtype = model_dtype(members[0])
    steps = settings.synth_steps
    # All random draws (labels, x^(0), jitter offsets) up front on CPU: identical on every device.
    labels, x, offsets = synthesis_start(num_classes, in_channels, settings, seed, image_size)
    labels = labels.to(device)  # (B,)
    # Channels-last images and weights select the fast convolution kernels (values unchanged).
    to_channels_last(members)
    x = x.to(device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    optimizer = torch.optim.Adam([x], lr=settings.synth_lr)
    trajectory = torch.empty((steps, *x.shape), device=device, dtype=dtype)  # (T, B, C_in, H, W)
    terms = torch.empty((steps, 3), device=device, dtype=torch.float64)  # CE, R_BN, R_TV
    # The loss forwards may run compiled; the final diagnostics below use the members as they are.
    teacher = EnsembleTeacher(loss_members(members, settings), settings.ensemble, "eval")
    cadence = Cadence(steps)  # a line every ~10% of the steps and at least every 30 s
    start = time.perf_counter()

    with preserved_modes(members), BNStatsHook(members) as bn_hook:
        for t in range(1, steps + 1):
            x_jit = torch.roll(x, shifts=offsets[t - 1], dims=(2, 3))  # (B, C_in, H, W)
            loss, step_terms = deepinversion_loss(teacher, bn_hook, x_jit, labels, settings)
            optimizer.zero_grad(set_to_none=True)
            # Only the images are optimised: members' parameter gradients are never formed.
            loss.backward(inputs=[x])
            optimizer.step()
            with torch.no_grad():  # device-side copies, no host sync
                trajectory[t - 1] = x
                terms[t - 1] = step_terms
            if progress and cadence.due(t):
                ce_v, bn_v, tv_v = terms[t - 1].tolist()
                log(
                    INFO,
                    "%s%ssynthesis step %s: CE %.4f, R_BN %.4f, R_TV %.2f",
                    position_text(), f"{tag}: " if tag else "", progress_text(t, steps, time.perf_counter() - start),
                    ce_v, bn_v, tv_v,
                )

    diagnostics = _final_diagnostics(members, settings, trajectory, labels, terms,
                                     num_classes, start, progress, tag)
    return trajectory, labels, diagnostics


def _final_diagnostics(members: Sequence[nn.Module], settings: SynthesisSettings,
                       trajectory: Tensor, labels: Tensor, terms: Tensor, num_classes: int,
                       start: float, progress: bool, tag: str) -> dict[str, Any]:
    """The ``diagnostics`` of :func:`synthesize_trajectory`, logged when ``progress``.

    The per-step terms, and how the ensemble of ``members`` sees the un-jittered final
    images x^(T) (accuracy on their targets, mean entropy).
    """
    with torch.no_grad(), preserved_modes(members):
        final_p = EnsembleTeacher(members, settings.ensemble, "eval").probs(
            trajectory[-1])  # (B, C), on un-jittered x^(T)
        accuracy = (final_p.argmax(dim=1) == labels).double().mean().item()
        entropy = -(torch.special.xlogy(final_p, final_p)).sum(dim=1).mean().item()
    terms_cpu = terms.cpu()
    diagnostics: dict[str, Any] = {
        "ce": terms_cpu[:, 0].tolist(),
        "bn": terms_cpu[:, 1].tolist(),
        "tv": terms_cpu[:, 2].tolist(),
        "teacher_accuracy": accuracy,
        "teacher_entropy": entropy,
        "max_entropy": math.log(num_classes),
        "chance_accuracy": torch.bincount(labels.cpu(), minlength=num_classes).max().item() / settings.synth_batch,
        "wall_time_s": time.perf_counter() - start,
    }
    if progress:
        log(
            INFO,
            "%ssynthesis done: teacher agrees with targets on %.1f%% of x^(T) (chance %.1f%%), "
            "mean entropy %.3f of %.3f nats, %.1f s",
            f"{tag}: " if tag else "", 100 * accuracy, 100 * diagnostics["chance_accuracy"],
            entropy, diagnostics["max_entropy"], diagnostics["wall_time_s"],
        )
    return diagnostics
