"""Losses of data-free distillation: KD (FedBiCross Eq. 5), DeepInversion priors (Eq. 2).

Shared by FedBiCross (Stages 1-2) and the baselines; FedBiCross's own schedule (Eq. 5) and
personalization loss (Eq. 9) are in :mod:`fedbicross_flwr.fedbicross.losses`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kd_kl(student_logits: Tensor, teacher_probs: Tensor, tau: float) -> Tensor:
    """Temperature-scaled KL divergence used for distillation.

    tau^2 * (1/B) * sum_b KL(p_b || softmax(s_b / tau)), with p the teacher's probabilities
    already computed at temperature tau. The tau^2 factor keeps gradient magnitudes comparable
    across temperatures (Hinton et al., 2015).

    Parameters
    ----------
    student_logits : Tensor
        (B, C) raw logits s of the student.
    teacher_probs : Tensor
        (B, C) teacher probabilities p (rows sum to 1), constants for the student.
    tau : float
        Temperature.

    Returns
    -------
    Tensor
        Scalar, batch mean.
    """
    log_q = F.log_softmax(student_logits / tau, dim=1)  # (B, C)
    # kl_div uses xlogy, so classes with p = 0 contribute exactly 0.
    return F.kl_div(log_q, teacher_probs.to(log_q.dtype), reduction="batchmean") * tau**2


def kd_loss(
    student_logits: Tensor,
    noise_teacher_probs: Tensor,
    teacher_probs: Tensor,
    lam: float,
    tau: float,
) -> Tensor:
    """Trajectory KD loss of Eq. 5.

    L_KD^(t) = lambda^(t) * KL(F~(x) || G(x)) + (1 - lambda^(t)) * KL(F(x) || G(x)),
    each KL at temperature tau and scaled by tau^2 (see :func:`kd_kl`).

    Parameters
    ----------
    student_logits : Tensor
        (B, C) logits of the cluster model G.
    noise_teacher_probs : Tensor
        (B, C) probabilities of the noise-adapted teacher F~ at temperature tau.
    teacher_probs : Tensor
        (B, C) probabilities of the original ensemble teacher F at temperature tau.
    lam : float
        lambda^(t) from :func:`lambda_schedule`.
    tau : float
        Temperature.

    Returns
    -------
    Tensor
        Scalar.
    """
    return lam * kd_kl(student_logits, noise_teacher_probs, tau) + (1.0 - lam) * kd_kl(
        student_logits, teacher_probs, tau
    )


def tv_loss(x: Tensor) -> Tensor:
    """Total-variation prior R_TV of Eq. 2, DeepInversion's (CIFAR code, also FedISCA) L2 form.

    R_TV(x) = ||d_h||_2 + ||d_v||_2 + ||d_d1||_2 + ||d_d2||_2, the Frobenius norms over the whole
    batch of the horizontal, vertical and both diagonal neighbour differences (not squared, not
    averaged). ``tv_weight = 2.5e-5`` was tuned for exactly this form.

    Parameters
    ----------
    x : Tensor
        (B, C, H, W) images.

    Returns
    -------
    Tensor
        Scalar.
    """
    d_h = x[:, :, :, :-1] - x[:, :, :, 1:]  # (B, C, H, W-1)
    d_v = x[:, :, :-1, :] - x[:, :, 1:, :]  # (B, C, H-1, W)
    d_d1 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]  # (B, C, H-1, W-1)
    d_d2 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]  # (B, C, H-1, W-1)
    return d_h.norm() + d_v.norm() + d_d1.norm() + d_d2.norm()


class _ColumnMoments(torch.autograd.Function):
    """Column mean and biased variance of a (n, C) matrix with a one-pass backward.

    Forward: mean = sum_i a_i / n and var = sum_i a_i^2 / n - mean^2 per column, accumulated in
    float32 (float64 kept). Backward, from d mean / d a_i = 1/n and d var / d a_i =
    2 (a_i - mean) / n:

        dL/da_i = g_mean / n + (2 g_var / n) * (a_i - mean) = c0 + c1 * a_i,

    one ``addcmul`` over the activation instead of autograd's chain through the upcast, the
    square and two means (several passes over the largest activations of a synthesis step).
    """

    @staticmethod
    def forward(ctx, rows: Tensor) -> tuple[Tensor, Tensor]:  # rows (n, C)
        n = rows.shape[0]
        full = rows if rows.dtype == torch.float64 else rows.float()  # (n, C)
        mean = full.sum(dim=0) / n  # (C,)
        var = (full * full).sum(dim=0) / n - mean * mean  # (C,)
        ctx.save_for_backward(rows, mean)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean: Tensor | None, g_var: Tensor | None) -> Tensor:
        rows, mean = ctx.saved_tensors
        n = rows.shape[0]
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        c1 = (2.0 / n) * g_var  # (C,)
        c0 = g_mean / n - c1 * mean  # (C,)
        return torch.addcmul(c0, rows, c1).to(rows.dtype)  # (n, C)


def channel_moments(a: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a (B, C, H, W) activation over (B, H, W).

    var = E[a^2] - E[a]^2 in float32 (autocast activations are upcast). For a channels-last
    activation the moments are column means of its (B*H*W, C) view, the fast reduction on CPU
    (``var``/``var_mean`` over dims (0, 2, 3) of the same tensor took 20 % of a synthesis step in
    a profile), with the one-pass backward of :class:`_ColumnMoments`; other layouts use
    autograd over dims (0, 2, 3). Same values up to float rounding (docs/BENCHMARKS.md).

    Parameters
    ----------
    a : Tensor
        (B, C, H, W) activation, any floating dtype and memory format.

    Returns
    -------
    mean, var : Tensor
        (C,) each, float32 (float64 for a float64 input).
    """
    channels = a.shape[1]
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
        return _ColumnMoments.apply(a.permute(0, 2, 3, 1).reshape(-1, channels))  # (B*H*W, C) view
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # statistics of autocast activations in full precision
    dims = (0, 2, 3)
    mean = a.mean(dim=dims)  # (C,)
    var = (a * a).mean(dim=dims) - mean * mean  # (C,)
    return mean, var


def _record_term(module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    """Forward hook of :class:`BNStatsHook`: r_l of this layer, kept on the layer itself.

    One module-level function for every layer and model, with no per-model state in a
    closure: ``torch.compile`` guards on a hook's closure, so a per-model index there compiled
    one graph per member position (and per cluster size) instead of one per architecture.
    """
    mean, var = channel_moments(inputs[0])  # (C_l,), (C_l,) from (B, C_l, H, W)
    r = (mean - module.running_mean.to(mean.dtype)).norm() + (  # type: ignore[union-attr]
        var - module.running_var.to(mean.dtype)  # type: ignore[union-attr]
    ).norm()
    module._bn_stats_terms.append(r)  # type: ignore[operator, union-attr]


class BNStatsHook:
    """Context manager computing the BN feature-statistics prior R_BN of Eq. 2 (DeepInversion).

    Registers a forward hook on every ``nn.BatchNorm2d`` of every model. For each layer l, the
    hook computes from the layer's INPUT a (B, C_l, H, W):

        r_l = ||mean_{b,h,w}(a) - running_mean_l||_2 + ||var_{b,h,w}(a) - running_var_l||_2

    with the biased variance (as BN itself normalises). Per model, R_BN = sum_l r_l; the models
    are then combined by ``loss(reduction)``. The hooks are removed on exit, also on exceptions.

    Parameters
    ----------
    models : Sequence[nn.Module]
        Ensemble members (normally in eval mode, so their running statistics stay fixed).

    Examples
    --------
    >>> with BNStatsHook(members) as bn:
    ...     logits = [m(x) for m in members]
    ...     r_bn = bn.loss("mean")
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # The BN layers of each model; each layer collects its own terms r_l (see _record_term).
        self._layers: list[list[nn.Module]] = [[] for _ in self.models]

    def __enter__(self) -> BNStatsHook:
        hooked: set[int] = set()
        for index, model in enumerate(self.models):
            for module in model.modules():
                # Layers without running statistics carry no prior to match.
                if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
                    self._layers[index].append(module)
                    if id(module) not in hooked:  # a model listed twice is hooked once
                        hooked.add(id(module))
                        module._bn_stats_terms = []  # type: ignore[assignment]
                        self._handles.append(module.register_forward_hook(_record_term))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks and the collected terms (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layers in self._layers:
            for module in layers:
                if hasattr(module, "_bn_stats_terms"):
                    del module._bn_stats_terms

    def reset(self) -> None:
        """Forget the terms collected so far (call before each forward pass)."""
        for layers in self._layers:
            for module in layers:
                module._bn_stats_terms = []  # type: ignore[assignment]

    def per_model(self) -> Tensor:
        """(n_models,) sum over BN layers of r_l, for each model."""
        totals = []
        for layers in self._layers:
            terms = [r for module in layers for r in getattr(module, "_bn_stats_terms", [])]
            if not terms:
                raise RuntimeError("no BatchNorm2d statistics collected for a model")
            totals.append(torch.stack(terms).sum())
        return torch.stack(totals)

    def loss(self, reduction: str = "mean") -> Tensor:
        """R_BN combined over models: 'mean' or 'sum' (FedISCA)."""
        per_model = self.per_model()  # (n_models,)
        if reduction == "mean":
            return per_model.mean()
        if reduction == "sum":
            return per_model.sum()
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
