"""Stage 1, noise-adapted teachers (Eq. 3) and the frozen teachers' soft labels.

The members' BN running statistics describe real images; early trajectory images are nearly
noise, on which those statistics give unreliable predictions. The noise-adapted copy F~_k
re-estimates them by forwarding the trajectory in reverse order (realistic x^(T) first, pure
noise x^(1) last), so the statistics drift from "real" towards "noise".
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..training import autocast
from .synthesis import EnsembleTeacher
from .utils import batchnorm_folded, compiled, frozen_buffers

_BatchNorm = nn.modules.batchnorm._BatchNorm


def effective_steps(steps: int, beta: float, cutoff: float) -> int:
    """L, the trajectory steps whose EMA weight matters: ceil(log(cutoff) / log(beta)) <= T.

    Parameters
    ----------
    steps : int
        T.
    beta : float
        Weight of the old value in Eq. 3 (torch momentum = 1 - beta).
    cutoff : float
        Total weight below which the oldest-weighted steps are skipped; 0 keeps all T.
    """
    if not 0.0 <= cutoff < 1.0:
        raise ValueError(f"cutoff must be in [0, 1), got {cutoff}")
    if cutoff == 0.0 or beta >= 1.0:  # no cutoff, or nothing is ever forgotten
        return steps
    if beta <= 0.0:  # only the last forwarded step, x^(1), survives
        return min(steps, 1)
    return min(steps, max(1, math.ceil(math.log(cutoff) / math.log(beta))))


@torch.no_grad()
def noise_adapted_copy(
    members: Sequence[nn.Module],
    trajectory: Tensor,
    beta: float = 0.9,
    mode: str = "eval",
    precision: str = "fp32",
    cutoff: float = 0.0,
    compile_forwards: bool = False,
) -> list[nn.Module]:
    """Deep copies of the members with BN statistics adapted to the trajectory (Eq. 3).

    For t = 1..T, each BN layer of each copy is updated with the batch statistics of
    x^(T-t+1) (reverse order), starting from the original running statistics:

        mu~ <- beta * mu~ + (1 - beta) * mu(x^(T-t+1)),  sigma~^2 likewise,

    which is PyTorch's train-mode BN update with ``momentum = 1 - beta`` (note that PyTorch
    stores the UNBIASED batch variance in running_var, as it does for the real statistics).

    Unrolled, the result is beta^T * original + sum_t (1 - beta) * beta^(t-1) * stat(x^(t)):
    the realistic late steps, forwarded first, carry the smallest weights. Train-mode BN
    normalises with batch statistics, so stat(x^(t)) does not depend on the running values
    and the steps are independent. With ``cutoff`` > 0 only x^(L), ..., x^(1) are forwarded,
    L = ceil(log(cutoff) / log(beta)): the skipped steps and the original statistics weigh
    beta^L <= cutoff together, so every adapted value moves by at most cutoff times the spread
    of the statistics it averages (at the paper's beta = 0.9 and cutoff 1e-7, L = 153 of
    T = 500; 1e-7 is below the float32 rounding of the EMA itself).

    Parameters
    ----------
    members : Sequence[nn.Module]
        Original client models; they are not modified.
    trajectory : Tensor
        (T, B, C_in, H, W) stored synthesis trajectory x^(1..T).
    beta : float
        The momentum of Eq. 3, the weight of the old statistic (paper: 0.9); the BN layers
        get PyTorch's ``momentum = 1 - beta``.
    mode : str
        'eval' (paper): the copies are returned in eval mode, i.e. they predict with the adapted
        running statistics. 'train' (FedISCA's code): BN layers are left in train mode, so the
        copies predict with per-batch statistics and never read the running statistics: the
        reverse pass is skipped (it cannot change an output) and the copies keep the
        members' statistics.
    precision : str
        'bf16' to run the adaptation forwards under autocast.
    cutoff : float
        Skip the steps whose total EMA weight is below this (0: forward every step).
    compile_forwards : bool
        Run the adaptation forwards through ``torch.compile`` (:func:`compiled`; run-config
        ``compile`` with ``compile-scope = "all"``); the copies returned are plain modules.

    Returns
    -------
    list[nn.Module]
        Frozen copies (``requires_grad`` False), one per member, in the requested mode.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    steps = effective_steps(trajectory.shape[0], beta, cutoff)
    momentum = 1.0 - beta  # PyTorch weighs the NEW batch statistic
    copies = []
    for member in members:
        adapted = copy.deepcopy(member)
        adapted.requires_grad_(False)
        adapted.eval()
        bn_layers = [m for m in adapted.modules() if isinstance(m, _BatchNorm)]
        for bn in bn_layers:
            bn.momentum = momentum  # also replaces a cumulative-average (None) momentum
            bn.train()  # only BN layers update statistics; nothing else changes behaviour
        forward = compiled(adapted, compile_forwards and mode == "eval")
        for t in range(steps - 1, -1, -1) if mode == "eval" else ():  # x^(L), ..., x^(1)
            with autocast(trajectory.device, precision):
                forward(trajectory[t])  # (B, C_in, H, W); output unused, BN buffers updated
        if mode == "eval":
            adapted.eval()
        copies.append(adapted)
    return copies


@torch.no_grad()
def teacher_soft_labels(
    teacher: EnsembleTeacher,
    trajectory: Tensor,
    tau: float,
    chunk: int = 8,
    precision: str = "fp32",
    fold_bn: bool = True,
    compile_forwards: bool = False,
) -> Tensor:
    """Probabilities of a frozen teacher at temperature tau for every trajectory step, once.

    Teachers never change during Stage 2, so their soft labels are computed a single time
    instead of at every KD step.

    Parameters
    ----------
    teacher : EnsembleTeacher
        F_k or F~_k. With ``bn_mode == 'train'`` every step is forwarded on its own, so the
        per-batch BN statistics are those of that step's B images.
    trajectory : Tensor
        (T, B, C_in, H, W).
    tau : float
        Temperature.
    chunk : int
        Trajectory steps forwarded together in eval mode (memory vs. speed).
    precision : str
        'bf16' to run the forwards under autocast.
    fold_bn : bool
        In eval mode, predict with BN folded into the convolutions (:func:`batchnorm_folded`;
        the same probabilities up to float rounding, fewer passes over the activations).
    compile_forwards : bool
        Run the members' forwards through ``torch.compile`` (:func:`compiled`; run-config
        ``compile`` with ``compile-scope = "all"``). The members are then compiled as they
        are, not BN-folded: a folded copy is a new torch.fx class, i.e. a new compile per
        member and epoch, while the members of one architecture share one graph (inductor
        fuses eval-mode BN into the pass after each convolution instead).

    Returns
    -------
    Tensor
        (T, B, C) probabilities, float32 (float64 if the trajectory is float64), on the
        trajectory's device.
    """
    steps, batch = trajectory.shape[:2]
    if teacher.bn_mode == "train":
        chunk = 1
    elif fold_bn and not compile_forwards:  # eval-mode BN is affine: fold it into the convs
        teacher = EnsembleTeacher([batchnorm_folded(m) for m in teacher.members],
                                  teacher.ensemble, "eval")
    members = teacher.members
    if compile_forwards:
        teacher = EnsembleTeacher([compiled(m, True) for m in members], teacher.ensemble,
                                  teacher.bn_mode)
    out = []
    with frozen_buffers(members):  # train-mode BN must not drift while predicting
        for start in range(0, steps, chunk):
            x = trajectory[start : start + chunk].flatten(0, 1)  # (c*B, C_in, H, W)
            with autocast(trajectory.device, precision):
                p = teacher.probs(x, tau)  # (c*B, C)
            out.append(p.to(torch.float64 if trajectory.dtype == torch.float64 else torch.float32))
    return torch.cat(out).reshape(steps, batch, -1)


@torch.no_grad()
def soft_label_profile(probs: Tensor, targets: Tensor, parts: int = 10) -> list[dict[str, object]]:
    """What a teacher's soft labels carry along the trajectory, per ``parts``-th of it.

    Parameters
    ----------
    probs : Tensor
        (T, B, C) soft labels of one teacher (at the KD temperature).
    targets : Tensor
        (B,) the synthesis targets y.
    parts : int
        Slices of the trajectory (tenths by default; fewer when T < parts).

    Returns
    -------
    list[dict]
        Per slice: ``steps`` (first, last; 1-based), ``argmax-histogram`` (C counts over the
        slice's images), ``entropy`` (mean, nats, at the temperature of ``probs``) and
        ``target-agreement`` (share of images whose argmax is their target).
    """
    steps, _, classes = probs.shape
    out = []
    bounds = torch.linspace(0, steps, min(parts, steps) + 1).round().long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        p = probs[lo:hi].float()  # (t, B, C)
        top = p.argmax(-1)  # (t, B)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        out.append({"steps": [lo + 1, hi],
                    "argmax-histogram": torch.bincount(top.flatten(), minlength=classes).tolist(),
                    "entropy": round(float(entropy), 4),
                    "target-agreement": round(float((top == targets.to(top.device)).float().mean()), 4)})
    return out
