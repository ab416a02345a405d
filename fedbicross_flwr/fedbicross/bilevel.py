"""Stage 2, online bi-level cross-cluster optimisation (paper Sec. III-B, Eq. 4-8).

For each target cluster k and trajectory step t:

* inner step (Eq. 7): G' = G - eta_G * sum_j w_{k,j} * grad L_j(G), with L_j the KD loss (Eq. 5)
  on source cluster j's TRAIN split of x_j^(t), labelled by cluster j's own teachers (F_j, F~_j);
* outer step (Eq. 8): w_k <- Proj_simplex(w_k - eta_w * dL_val(G')/dw_k), with L_val the KD loss
  on cluster k's own VALIDATION split of x_k^(t).

The inner loss is linear in w, and the per-source gradients g_j = grad L_j(G) do not depend on
w, so G'(w) is affine in w and the hypergradient is exact and first-order:

    dL_val(G')/dw_j = <grad L_val(G'), dG'/dw_j> = -eta_G * <g_val, g_j>.

This also holds with heavy-ball momentum and weight decay (neither term depends on the current
w). No second-order autograd is needed. G' is the committed model G^(t) (Eq. 7-8), not a
throw-away look-ahead.

BatchNorm handling (the paper is silent). Every forward runs through
``torch.func.functional_call`` with CLONED buffers, in train mode (batch statistics):
- each source j is forwarded on its own, so L_j and g_j depend only on x_j (a zero-weight
  source cannot leak in through shared batch statistics);
- the validation forward at G' also uses batch statistics (a random-init student's running
  statistics are meaningless early on) and its buffer updates are discarded;
- the student's real running statistics are then set to the w-weighted mixture of the
  per-source updates, sum_j w_j * ((1 - m) * old + m * stat_j) = (1 - m) * old + m * sum_j w_j
  stat_j, i.e. they track the same weighted mixture that the inner loss trains on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..distill.losses import kd_loss
from ..distill.utils import cpu_generator, derive_seed, to_channels_last, to_contiguous
from ..logging_utils import Cadence, log, position_text, progress_text
from ..training import autocast, autocast_off
from .config import FedBiCrossSettings
from .losses import lambda_schedule

# What torch's multi-tensor (``_foreach``) functions take and return.
TensorList = tuple[Tensor, ...] | list[Tensor]

def project_to_simplex(v: Tensor) -> Tensor:
    """Exact Euclidean projection onto the probability simplex (Duchi et al., ICML 2008).

    argmin_w ||w - v||_2  s.t.  w >= 0, sum(w) = 1. With u = v sorted in decreasing order,
    rho = max{j : u_j - (sum_{r<=j} u_r - 1) / j > 0} and theta = (sum_{r<=rho} u_r - 1) / rho,
    the projection is max(v - theta, 0). Shifting v by a constant does not change the result.

    Parameters
    ----------
    v : Tensor
        (K,) any real vector.

    Returns
    -------
    Tensor
        (K,) same dtype and device, on the simplex.
    """
    if v.ndim != 1 or v.numel() == 0:
        raise ValueError(f"v must be a non-empty 1-D tensor, got shape {tuple(v.shape)}")
    u, _ = torch.sort(v, descending=True)  # (K,)
    css = torch.cumsum(u, dim=0) - 1.0  # (K,)
    j = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)  # (K,)
    # The condition holds exactly for a prefix j = 1..rho, so rho = number of True.
    rho = (u - css / j > 0).sum().clamp(min=1)
    theta = css.gather(0, (rho - 1).view(1)) / rho.to(v.dtype)  # (1,)
    return torch.clamp(v - theta, min=0.0)


def outer_update(weights: Tensor, hypergradient: Tensor, lr: float, normalisation: str) -> Tensor:
    """One outer step (Eq. 8) followed by the simplex projection.

    Parameters
    ----------
    weights : Tensor
        (K,) current w_k on the simplex.
    hypergradient : Tensor
        (K,) dL_val/dw_k.
    lr : float
        eta_w.
    normalisation : str
        'unit': centre the hypergradient (its (1,...,1) component does not change the projected
        result) and scale it to unit L2 norm, so each step has length eta_w whatever the scale
        of the raw hypergradient; a zero centred hypergradient (e.g. K = 1) gives no step.
        'none': the raw hypergradient.

    Returns
    -------
    Tensor
        (K,) new w_k on the simplex.
    """
    h = hypergradient.to(weights.dtype)
    if normalisation == "unit":
        h = h - h.mean()
        norm = h.norm()
        # torch.where instead of an `if`: no device-to-host sync on CUDA.
        h = torch.where(norm > 1e-12, h / norm.clamp(min=1e-12), torch.zeros_like(h))
    elif normalisation != "none":
        raise ValueError(f"normalisation must be 'unit' or 'none', got {normalisation!r}")
    return project_to_simplex(weights - lr * h)


def split_indices(batch_size: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Fixed partition I^train, I^val of {0..B-1} (Sec. III-B-1), at least one index in each.

    Returns
    -------
    tuple[Tensor, Tensor]
        Sorted int64 CPU tensors (train indices, validation indices).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 to split, got {batch_size}")
    n_val = min(batch_size - 1, max(1, round(val_fraction * batch_size)))
    perm = torch.randperm(batch_size, generator=cpu_generator(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@dataclass
class InnerStepResult:
    """Outcome of one inner step for one target cluster.

    Attributes
    ----------
    hypergradient : Tensor or None
        (K,) dL_val(G')/dw, in the dtype/device of ``weights``; None if not requested.
    source_losses : Tensor
        (K,) L_j(G) before the step (NaN for skipped zero-weight sources).
    val_loss : Tensor
        Scalar L_val(G') after the step.
    """

    hypergradient: Tensor | None
    source_losses: Tensor
    val_loss: Tensor


def _functional_forward(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                        x: Tensor) -> Tensor:
    """``model(x)`` with the given parameters and buffers (train-mode BN updates ``buffers``)."""
    return functional_call(model, (params, buffers), (x,))


@functools.cache
def _compiled_forward() -> Callable[..., Tensor]:
    """:func:`_functional_forward` under ``torch.compile`` (one wrapper per process; the
    students are graph inputs, so the K students of one architecture share its graphs).
    """
    return torch.compile(_functional_forward, dynamic=False)


def student_forward(compiled: bool) -> Callable[..., Tensor]:
    """The student forward of the bi-level step: compiled (run-config ``compile`` with
    ``compile-scope = "all"``) or eager.
    """
    return _compiled_forward() if compiled else _functional_forward


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _cloned_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all elements: one read of each tensor, no product tensor, for tensors of the
    same memory layout (channels-last gradients are viewed in their storage order).
    """
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) \
            and b.is_contiguous(memory_format=torch.channels_last):
        return torch.vdot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    if a.is_contiguous() and b.is_contiguous():
        return torch.vdot(a.view(-1), b.view(-1))
    return (a * b).sum()


def inner_step_and_hypergradient(
    model: nn.Module,
    weights: Tensor,
    source_inputs: Sequence[Tensor],
    source_noise_probs: Sequence[Tensor],
    source_teacher_probs: Sequence[Tensor],
    val_inputs: Tensor,
    val_noise_probs: Tensor,
    val_teacher_probs: Tensor,
    lam: float,
    tau: float,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    momentum_buffers: dict[str, Tensor] | None = None,
    compute_hypergradient: bool = True,
    precision: str = "fp32",
    bn_mode: str = "train",
    active_sources: Sequence[int] | None = None,
    compiled: bool = False,
) -> InnerStepResult:
    """Inner update (Eq. 7) of one cluster model, in place, and the exact hypergradient (Eq. 8).

    Parameters
    ----------
    model : nn.Module
        Cluster model G_k; its parameters, running BN statistics and (if given) momentum
        buffers are updated in place to G_k^(t).
    weights : Tensor
        (K,) w_k^(t-1) on the simplex.
    source_inputs : Sequence[Tensor]
        K tensors (n_train, C_in, H, W): x_j^(t, train).
    source_noise_probs, source_teacher_probs : Sequence[Tensor]
        K tensors (n_train, C): F~_j and F_j at temperature tau on x_j^(t, train).
    val_inputs : Tensor
        (n_val, C_in, H, W): x_k^(t, val).
    val_noise_probs, val_teacher_probs : Tensor
        (n_val, C): F~_k and F_k at temperature tau on x_k^(t, val).
    lam : float
        lambda^(t) of Eq. 5.
    tau : float
        Temperature.
    lr : float
        eta_G.
    momentum : float
        Heavy-ball momentum (PyTorch SGD convention: buf <- m * buf + d, first buf = d).
    weight_decay : float
        L2 decay added to the update direction (not to the L_j, so not to the hypergradient).
    momentum_buffers : dict or None
        Parameter name -> momentum buffer, created/updated in place (needed if momentum > 0).
    compute_hypergradient : bool
        False for fixed-weight ablations: no per-source gradients are kept for the outer step,
        zero-weight sources are skipped and the validation loss is evaluated without autograd.
    precision : str
        'bf16' to run forwards under autocast.
    bn_mode : str
        'train': BN uses batch statistics and the running statistics become the w-weighted
        mixture of the per-source updates (module docstring). 'keep': BN uses batch
        statistics, the running statistics are left unchanged. 'eval': BN uses the running
        statistics in every forward and they are left unchanged.
    active_sources : Sequence[int] or None
        Fixed weights: the sources of non-zero weight (None: read from ``weights``, a sync).
    compiled : bool
        Run the student forwards through ``torch.compile`` (:func:`student_forward`).

    Returns
    -------
    InnerStepResult
    """
    _check_step(weights, len(source_inputs), bn_mode)
    device = val_inputs.device
    params = _trainable(model)
    names = list(params)
    # 'train' and 'keep': BN uses batch statistics in every functional forward below; 'eval':
    # the running statistics. Only 'train' commits the running-statistics update below.
    model.train(bn_mode != "eval")

    # --- per-source losses L_j and gradients g_j at G ------------------------------------------
    active = _active(weights, compute_hypergradient, active_sources)
    param_list = [params[n] for n in names]
    forward = student_forward(compiled)
    source_losses, grads, source_buffers = _source_gradients(
        model, params, active, source_inputs, source_noise_probs, source_teacher_probs, lam, tau,
        weights, device, precision, forward)

    # --- inner update G' = G - eta_G * (momentum-filtered) sum_j w_j g_j (Eq. 7) --------------
    stepped = _inner_update(param_list, names, grads, weights, device, lr, momentum,
                            weight_decay, momentum_buffers)
    new_params = {name: p.requires_grad_(compute_hypergradient) for name, p in zip(names, stepped)}

    # --- validation loss at G' and hypergradient (Eq. 8) ----------------------------------------
    val_loss, hypergradient = _validation_and_hypergradient(
        model, new_params, grads, val_inputs, val_noise_probs, val_teacher_probs, lam, tau, lr,
        weights.dtype, compute_hypergradient, precision, forward)

    # --- commit G^(t) = G' and the w-weighted BN running statistics ------------------------------
    _commit(model, param_list, [new_params[n] for n in names], source_buffers, weights, bn_mode)
    return InnerStepResult(hypergradient, source_losses, val_loss.detach())


def _check_step(weights: Tensor, num_sources: int, bn_mode: str) -> None:
    """Raise ValueError for weights of another shape than (K,) or an unknown ``bn_mode``."""
    if weights.shape != (num_sources,):
        raise ValueError(f"weights must have shape ({num_sources},), got {tuple(weights.shape)}")
    if bn_mode not in ("train", "keep", "eval"):
        raise ValueError(f"bn_mode must be 'train', 'keep' or 'eval', got {bn_mode!r}")


def _active(weights: Tensor, compute_hypergradient: bool,
            known: Sequence[int] | None) -> Sequence[int]:
    """The sources whose gradients a step needs: all when the weights are learnt, else those
    of non-zero weight (``known``, or read from ``weights``: a device-to-host sync).
    """
    if compute_hypergradient:
        return range(weights.numel())
    if known is not None:
        return known
    return [j for j, w in enumerate(weights.tolist()) if w > 0.0]


def _validation_and_hypergradient(
    model: nn.Module, new_params: dict[str, Tensor], grads: dict[int, tuple[Tensor, ...]],
    val_inputs: Tensor, val_noise_probs: Tensor, val_teacher_probs: Tensor, lam: float,
    tau: float, lr: float, dtype: torch.dtype, compute_hypergradient: bool,
    precision: str, forward: Callable[..., Tensor] = _functional_forward,
) -> tuple[Tensor, Tensor | None]:
    """L_val(G') and, if asked, the (K,) hypergradient -eta_G <dL_val/dG', g_j> (Eq. 8).

    The forward uses batch statistics on cloned buffers (their updates are discarded).
    """
    device = val_inputs.device
    buffers_val = _cloned_buffers(model)  # batch-stat forward; its buffer updates are discarded
    with torch.set_grad_enabled(compute_hypergradient), autocast(device, precision):
        logits_val = forward(model, new_params, buffers_val, val_inputs)  # (n_val, C)
    logits_val = logits_val.float() if logits_val.dtype == torch.bfloat16 else logits_val
    with torch.set_grad_enabled(compute_hypergradient):
        val_loss = kd_loss(logits_val, val_noise_probs, val_teacher_probs, lam, tau)
    if not compute_hypergradient:
        return val_loss, None
    g_val = torch.autograd.grad(val_loss, list(new_params.values()))
    dots = torch.stack([  # (K,) <g_val, g_j>
        torch.stack([_dot(gv, gj) for gv, gj in zip(g_val, grads[j])]).sum()
        for j in range(len(grads))
    ])
    return val_loss, (-lr * dots).to(dtype)


def _source_gradients(
    model: nn.Module, params: dict[str, Tensor], active: Sequence[int],
    source_inputs: Sequence[Tensor], source_noise_probs: Sequence[Tensor],
    source_teacher_probs: Sequence[Tensor], lam: float, tau: float, weights: Tensor,
    device: torch.device, precision: str, forward: Callable[..., Tensor] = _functional_forward,
) -> tuple[Tensor, dict[int, tuple[Tensor, ...]], dict[int, dict[str, Tensor]]]:
    """L_j(G), g_j = dL_j/dG and each source's BN running-statistics update, for j in ``active``.

    Returns the (K,) losses (NaN where inactive), the gradients and the updated buffers by
    source (see :func:`inner_step_and_hypergradient`).
    """
    source_losses = torch.full((len(source_inputs),), float("nan"), dtype=weights.dtype,
                               device=weights.device)
    grads: dict[int, tuple[Tensor, ...]] = {}
    source_buffers: dict[int, dict[str, Tensor]] = {}
    param_list = list(params.values())
    # One autocast region for the K source forwards: autocast casts each leaf parameter to
    # bf16 once and reuses the cast (its cache lives until the region ends), not once per source.
    with autocast(device, precision):
        for j in active:
            buffers_j = _cloned_buffers(model)  # this source's BN running-stat update lands here
            logits = forward(model, params, buffers_j, source_inputs[j])  # (n, C)
            with autocast_off(device, precision):  # loss and backward as before
                loss_j = kd_loss(logits.float() if logits.dtype == torch.bfloat16 else logits,
                                 source_noise_probs[j], source_teacher_probs[j], lam, tau)
                grads[j] = torch.autograd.grad(loss_j, param_list)
            source_buffers[j] = buffers_j
            source_losses[j] = loss_j.detach().to(weights.dtype)
    return source_losses, grads, source_buffers


@torch.no_grad()
def _inner_update(param_list: list[Tensor], names: list[str],
                  grads: dict[int, tuple[Tensor, ...]], weights: Tensor, device: torch.device,
                  lr: float, momentum: float, weight_decay: float,
                  momentum_buffers: dict[str, Tensor] | None) -> TensorList:
    """G - eta_G * (momentum-filtered) (sum_j w_j g_j + weight_decay * G), as new tensors.

    Multi-tensor (foreach) updates over all parameters at once; the weights stay on the
    device as 0-dim tensors (no host sync). ``momentum_buffers`` is updated in place.
    """
    w = weights.to(device=device, dtype=param_list[0].dtype)  # (K,)
    sources = list(grads)
    direction: TensorList = torch._foreach_mul(grads[sources[0]], w[sources[0]])
    for j in sources[1:]:
        torch._foreach_add_(direction, torch._foreach_mul(grads[j], w[j]))
    if weight_decay:
        torch._foreach_add_(direction, param_list, alpha=weight_decay)
    if momentum:
        if momentum_buffers is None:
            raise ValueError("momentum > 0 needs a momentum_buffers dict")
        if all(name in momentum_buffers for name in names):
            bufs = [momentum_buffers[name] for name in names]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, direction)
        else:
            bufs = [d.clone() for d in direction]
            momentum_buffers.update(zip(names, bufs))
        direction = bufs
    return torch._foreach_add(param_list, direction, alpha=-lr)  # G - eta_G * direction


@torch.no_grad()
def _commit(model: nn.Module, param_list: list[Tensor], new_values: TensorList,
            source_buffers: dict[int, dict[str, Tensor]], weights: Tensor, bn_mode: str) -> None:
    """G^(t) = G' in place, and (``bn_mode`` 'train') the w-weighted BN running statistics."""
    torch._foreach_copy_(param_list, new_values)
    for name, buffer in model.named_buffers():
        if not source_buffers or bn_mode != "train":
            break
        if buffer.is_floating_point():
            w = weights.to(device=buffer.device, dtype=buffer.dtype)
            buffer.copy_(sum(w[j] * source_buffers[j][name] for j in source_buffers))  # type: ignore[arg-type]
        else:  # num_batches_tracked: identical in every source copy
            buffer.copy_(next(iter(source_buffers.values()))[name])


def fixed_weights(mode: str, num_clusters: int, similarity: np.ndarray | None = None) -> np.ndarray:
    """Initial (or, for ablations, fixed) cross-cluster weights, (K, K), rows on the simplex.

    'bilevel' and 'uniform': 1/K (Algorithm 1, line 12); 'intra': identity (own cluster only);
    'similarity': the given row-normalised centroid similarity.
    """
    if mode in ("bilevel", "uniform"):
        return np.full((num_clusters, num_clusters), 1.0 / num_clusters)
    if mode == "intra":
        return np.eye(num_clusters)
    if mode == "similarity":
        if similarity is None or similarity.shape != (num_clusters, num_clusters):
            raise ValueError("weights_mode 'similarity' needs a (K, K) similarity matrix")
        return np.asarray(similarity, dtype=np.float64)
    raise ValueError(f"unknown weights mode {mode!r}")


class OnlineBilevelTrainer:
    """Runs Eq. 6-8 online over a trajectory for all K cluster models; state carries over epochs.

    Parameters
    ----------
    students : list[nn.Module]
        Cluster models G_1..G_K, on ``device``, trained in place.
    settings : FedBiCrossSettings
        Uses tau, student_lr (with student_lr_milestones), student_momentum, student_weight_decay, weight_lr,
        hypergrad_norm, weights_mode, bilevel_val_fraction, seed, precision.
    initial_weights : np.ndarray
        (K, K) w^(0), rows on the simplex (see :func:`fixed_weights`).
    device : torch.device or str
        Device of the students and trajectories.
    """

    def __init__(
        self,
        students: list[nn.Module],
        settings: FedBiCrossSettings,
        initial_weights: np.ndarray,
        device: torch.device | str,
    ) -> None:
        self.students = students
        self.settings = settings
        self.device = torch.device(device)
        self.num_clusters = len(students)
        if initial_weights.shape != (self.num_clusters, self.num_clusters):
            raise ValueError(f"initial_weights must be (K, K) with K={self.num_clusters}")
        self.weights = torch.as_tensor(initial_weights, dtype=torch.float64, device=self.device)
        # With one cluster the only point of the simplex is w = [1]: nothing to learn.
        self.learn_weights = settings.weights_mode == "bilevel" and self.num_clusters > 1
        self.momentum_buffers: list[dict[str, Tensor]] = [{} for _ in students]
        # Fixed weights: each target's sources of non-zero weight, read from the host array
        # once (not from the device tensor at every step).
        self.active_sources = None if self.learn_weights else [
            [j for j, w in enumerate(row) if w > 0.0] for row in initial_weights.tolist()]
        self._split: tuple[Tensor, Tensor] | None = None
        # eta_G of the current server epoch (``student-lr-milestones``); set by run_epoch.
        self.lr = settings.student_lr

    def split(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The fixed train/val index split (same for every step, cluster and epoch)."""
        if self._split is None or self._split[0].numel() + self._split[1].numel() != batch_size:
            self._split = split_indices(
                batch_size, self.settings.bilevel_val_fraction, derive_seed(self.settings.seed, 2)
            )
        return self._split

    def run_epoch(
        self,
        trajectories: Sequence[Tensor],
        teacher_probs: Sequence[Tensor],
        noise_probs: Sequence[Tensor],
        progress: bool = True,
        tag: str = "",
        epoch: int = 0,
    ) -> dict[str, np.ndarray]:
        """One pass t = 1..T over the K trajectories, at server epoch ``epoch``'s eta_G.

        Parameters
        ----------
        trajectories : Sequence[Tensor]
            K tensors (T, B, C_in, H, W), x_j^(1..T).
        teacher_probs, noise_probs : Sequence[Tensor]
            K tensors (T, B, C): F_j and F~_j at temperature tau on x_j^(1..T).
        progress : bool
            Log every ~10% of the steps and at least every 30 s.
        tag : str
            Log prefix.
        epoch : int
            0-based server epoch: eta_G is ``settings.lr_at(epoch)`` for every step of this
            pass (step decay at ``student-lr-milestones``), in the inner step (Eq. 7) and in
            the hypergradient of Eq. 8, which stays exact.

        Returns
        -------
        dict[str, np.ndarray]
            'weights': (T, K, K) w after each step (row k = target k); 'val_loss': (T, K);
            'source_loss': (T, K, K) L_j(G_k) before each step.
        """
        K = self.num_clusters
        if not (len(trajectories) == len(teacher_probs) == len(noise_probs) == K):
            raise ValueError(f"need K={K} trajectories and soft labels")
        steps, batch = trajectories[0].shape[:2]
        kd_batch = self.settings.kd_batch or batch  # images per KD step
        if batch % kd_batch:
            raise ValueError(f"kd_batch={kd_batch} does not divide the synthetic batch {batch}")
        train_idx, val_idx = (i.to(self.device) for i in self.split(kd_batch))
        self.lr = self.settings.lr_at(epoch)
        history = torch.empty((steps, K, K), dtype=torch.float64, device=self.device)
        val_losses = torch.empty((steps, K), dtype=torch.float64, device=self.device)
        source_losses = torch.empty((steps, K, K), dtype=torch.float64, device=self.device)
        log_every = max(1, steps // 10)
        start = time.perf_counter()
        # Channels-last weights select the fast convolution kernels; the students go back to
        # plain NCHW storage at the end, so their state dicts leave in the usual layout.
        to_channels_last(self.students)
        try:
            self._steps(trajectories, teacher_probs, noise_probs, train_idx, val_idx, history,
                        val_losses, source_losses, progress, tag, log_every, start)
        finally:
            to_contiguous(self.students)
        return {
            "weights": history.cpu().numpy(),
            "val_loss": val_losses.cpu().numpy(),
            "source_loss": source_losses.cpu().numpy(),
        }

    def _steps(
        self,
        trajectories: Sequence[Tensor],
        teacher_probs: Sequence[Tensor],
        noise_probs: Sequence[Tensor],
        train_idx: Tensor,
        val_idx: Tensor,
        history: Tensor,
        val_losses: Tensor,
        source_losses: Tensor,
        progress: bool,
        tag: str,
        log_every: int,
        start: float,
    ) -> None:
        """The loop t = 1..T of :meth:`run_epoch`, filling the (T, ...) history tensors in place."""
        steps, batch = trajectories[0].shape[:2]
        kd_batch = train_idx.numel() + val_idx.numel()
        checked = 0  # val_losses[:checked] are known to be finite
        cadence = Cadence(steps)  # a line every ~10% of the steps and at least every 30 s
        for t in range(1, steps + 1):
            # kd-batch < B: the step's B images are B / kd-batch consecutive KD steps (the
            # history keeps the last one's losses).
            for lo in range(0, batch, kd_batch):
                part = slice(lo, lo + kd_batch)
                val_losses[t - 1], source_losses[t - 1] = self.step(
                    t, steps,
                    [traj[t - 1, part] for traj in trajectories],
                    [p[t - 1, part] for p in teacher_probs],
                    [p[t - 1, part] for p in noise_probs],
                    train_idx, val_idx,
                )
            history[t - 1] = self.weights
            if t % log_every == 0 or t == steps:  # one host sync per ~10% of the steps
                recent = val_losses[checked:t]  # the steps since the last check
                checked = t
                bad = (~torch.isfinite(recent)).any(dim=0).nonzero().flatten().tolist()
                if bad:
                    raise FloatingPointError(
                        f"{tag + ': ' if tag else ''}bi-level step {t}/{steps}: the validation "
                        f"KD loss of cluster(s) {bad} is not finite: G_k diverged (its "
                        "parameters are NaN/Inf). Lower student-lr, or keep student-bn='train'; "
                        "the checkpoints taken so far are kept, so the run resumes from the "
                        "last finished stage with resume=true."
                    )
            if progress and cadence.due(t):
                log(
                    INFO,
                    "%s%sbi-level step %s: eta_G %g, val KD loss per cluster %s, weights %s",
                    position_text(), f"{tag}: " if tag else "", progress_text(t, steps, time.perf_counter() - start),
                    self.lr, np.round(val_losses[t - 1].cpu().numpy(), 4).tolist(),
                    np.round(self.weights.cpu().numpy(), 3).tolist(),
                )

    def step(
        self,
        t: int,
        steps: int,
        images: Sequence[Tensor],
        teacher_probs: Sequence[Tensor],
        noise_probs: Sequence[Tensor],
        train_idx: Tensor,
        val_idx: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Bi-level step t of T for every target cluster (Eq. 7-8), in place.

        Parameters
        ----------
        t, steps : int
            Step index in 1..T and T (they set lambda^(t) of Eq. 5).
        images : Sequence[Tensor]
            K tensors (B, C_in, H, W), x_j^(t).
        teacher_probs, noise_probs : Sequence[Tensor]
            K tensors (B, C): F_j and F~_j at temperature tau on x_j^(t).
        train_idx, val_idx : Tensor
            The fixed split (see :meth:`split`), on the device.

        Returns
        -------
        val_losses : Tensor
            (K,) float64 L_val(G_k^(t)).
        source_losses : Tensor
            (K, K) float64 L_j(G_k^(t-1)), row k = target k.
        """
        s = self.settings
        K = self.num_clusters
        lam = lambda_schedule(t, steps)
        x_train = [x[train_idx] for x in images]  # K x (n_tr, C_in, H, W)
        f_train = [p[train_idx] for p in teacher_probs]  # K x (n_tr, C)
        fn_train = [p[train_idx] for p in noise_probs]  # K x (n_tr, C)
        val_losses = torch.empty((K,), dtype=torch.float64, device=self.device)
        source_losses = torch.empty((K, K), dtype=torch.float64, device=self.device)
        new_weights = self.weights.clone()
        for k in range(K):
            result = inner_step_and_hypergradient(
                self.students[k],
                self.weights[k],
                x_train,
                fn_train,
                f_train,
                images[k][val_idx],
                noise_probs[k][val_idx],
                teacher_probs[k][val_idx],
                lam=lam,
                tau=s.kd_temperature,
                lr=self.lr,
                momentum=s.student_momentum,
                weight_decay=s.student_weight_decay,
                momentum_buffers=self.momentum_buffers[k],
                compute_hypergradient=self.learn_weights,
                precision=s.precision,
                bn_mode=s.student_bn,
                active_sources=None if self.active_sources is None else self.active_sources[k],
                compiled=s.compile_all,
            )
            if self.learn_weights:
                new_weights[k] = outer_update(
                    self.weights[k], result.hypergradient, s.weight_lr, s.hypergrad_norm  # type: ignore[arg-type]
                )
            val_losses[k] = result.val_loss.to(torch.float64)
            source_losses[k] = result.source_losses.to(torch.float64)
        self.weights = new_weights  # targets are independent: update all rows together
        return val_losses, source_losses
