"""Co-Boosting (Dai et al., ICLR 2024), reference code rong-dai/Co-Boosting (read, not copied).

The ensemble is weighted per client, T(x) = sum_i w_i f_i(x) / sum_i w_i (logits), w_i = 1/N at
the start. Each of ``gen-epochs`` epochs e:

1. hard-sample generation: a re-initialised generator and latent batch are trained (Adam,
   ``gen-lr``, betas 0.5/0.999, generator gradient norm clipped at 10) for ``gen-steps`` steps
   on ``gen-ce-weight * mean_b (1 - p_b,y)^h CE_b + gen-adv-weight * L_adv`` with h =
   ``coboosting-hard-power`` and L_adv = -mean_b KL_T=3(T(x_b) || S(x_b)) over ALL samples
   (no BN term: the reference's default bn = 0); the lowest-loss batch is kept;
2. ensemble boosting (e > 0): one pass over the pool (before the new batch joins it) with
   w <- clip(w - mu * decay^e * sign(dCE(T(x), y)/dw), 0, 1) after every batch;
3. the batch joins the pool; the student is distilled for one pass over the pool at
   ``coboosting-kd-temperature`` (4) on ODS-perturbed inputs x + eta * sign(grad_x <r,
   softmax(T(x)/tau)>), r ~ U(-1, 1) (eta = ``coboosting-ods-eta``, 8/255), SGD (``gen-kd-lr``,
   momentum 0.9, weight decay 1e-4, cosine annealing over the epochs, gradient norm clip 10).

Reference defaults: 200 epochs, g_steps 30, lr_g 1e-3, batch 128 (``gen-batch`` 256 here is
shared with DENSE), nz 256, KD lr 0.01, T 4, mu 0.01, wdc 0.99, eta 8/255, h 1.
Deviations: float pool instead of PNGs, no crop/flip augmentation; a weight step that would
zero every weight is not taken (the reference would divide by zero).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...distill.utils import cpu_generator, derive_seed
from ...logging_utils import log
from ...training import autocast
from ..base import MethodInput, MethodOutput
from .common import finish
from .config import CoBoostingConfig, GeneratorConfig
from .generator import (
    SyntheticPool,
    ensemble_logits,
    generator_method_start,
    kd_pass,
    member_logits,
    train_generator_round,
)


def update_ensemble_weights(
    members: list[nn.Module] | None,
    batches: list[tuple[Tensor, Tensor]],
    weights: Tensor,
    step: float,
    logits_fn=None,
) -> Tensor:
    """Co-Boosting's ensemble-weight boosting: per batch, a sign-gradient step on CE, clipped.

    For each batch (x, y): g = dCE(sum_i w_i f_i(x) / sum_i w_i, y)/dw,
    w <- clip(w - step * sign(g), 0, 1). A step that would zero every weight is skipped.

    Parameters
    ----------
    members : list[nn.Module] or None
        Frozen client models (ignored when ``logits_fn`` is given).
    batches : list of (Tensor, Tensor)
        (x, y) pairs: pool images and their generation targets.
    weights : Tensor
        (N,) current weights in [0, 1].
    step : float
        mu * decay^epoch.
    logits_fn : callable, optional
        x -> (N, B, C) member logits (default: the members' forward passes, no grad).

    Returns
    -------
    Tensor
        (N,) new weights in [0, 1].
    """
    w = weights.detach().clone()
    for x, y in batches:
        with torch.no_grad():
            logits = logits_fn(x) if logits_fn is not None else member_logits(members, x)  # type: ignore[arg-type]
        w_var = w.clone().requires_grad_(True)
        loss = F.cross_entropy(ensemble_logits(logits, w_var), y)
        (grad,) = torch.autograd.grad(loss, w_var)
        candidate = (w - step * grad.sign()).clamp(0.0, 1.0)
        if candidate.sum() <= 0:
            log(WARNING, "coboosting: a weight step would zero every weight; skipped")
            continue
        w = candidate
    return w


def ods_perturbation(teacher, x: Tensor, eta: float, tau: float, generator: torch.Generator
                     ) -> Tensor:
    """Output-diversified sampling: x + eta * sign(grad_x sum(r * softmax(T(x) / tau))),
    r ~ U(-1, 1) per output (drawn from the seeded CPU generator).
    """
    if eta == 0:
        return x
    x = x.detach().clone().requires_grad_(True)
    logits = teacher(x)  # (B, C)
    r = (torch.rand(logits.shape, generator=generator) * 2 - 1).to(logits)
    (grad,) = torch.autograd.grad((r * F.softmax(logits / tau, dim=1)).sum(), x)
    return (x + eta * grad.sign()).detach()


def coboosting(inp: MethodInput) -> MethodOutput:
    """Co-Boosting server stage: one global model for every client."""
    cfg = inp.cfg
    g, c = GeneratorConfig.of(cfg), CoBoostingConfig.of(cfg)
    start = time.perf_counter()
    members, student, generator, settings = generator_method_start(
        inp, 301, bn_weight=0.0, bn_reduction="mean", hard_power=c.coboosting_hard_power,
        adv_masked=False, adv_tau=3.0, grad_clip=10.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=g.gen_kd_lr, momentum=0.9,
                                weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=g.gen_epochs)
    weights = torch.full((len(members),), 1.0 / len(members), device=inp.device)
    tau = c.coboosting_kd_temperature
    pool = SyntheticPool()
    history: list[dict] = []
    weight_history = [weights.cpu().tolist()]
    log_every = max(1, g.gen_epochs // 10)

    def _member_logits(x: Tensor) -> Tensor:
        with autocast(inp.device, cfg.precision):
            return member_logits(members, x)  # (N, B, C) float32

    for epoch in range(g.gen_epochs):
        images, targets, gen_diag = train_generator_round(
            generator, members, student, settings, derive_seed(cfg.seed, 302, epoch), weights)
        if epoch > 0:
            step = c.coboosting_weight_lr * c.coboosting_weight_decay**epoch
            batches = [(x, y) for x, y, _ in pool.batches(g.gen_batch,
                                                          derive_seed(cfg.seed, 303, epoch))]
            weights = update_ensemble_weights(members, batches, weights, step,
                                              logits_fn=_member_logits)
        weight_history.append(weights.cpu().tolist())
        pool.add(images, targets)
        current = weights.clone()

        def teacher(x: Tensor, w: Tensor = current) -> Tensor:
            return ensemble_logits(_member_logits(x), w)

        ods_rng = cpu_generator(derive_seed(cfg.seed, 304, epoch))
        kd_diag = kd_pass(student, optimizer, pool, g.gen_batch, tau,
                          derive_seed(cfg.seed, 305, epoch), teacher=teacher,
                          perturb=lambda x: ods_perturbation(teacher, x, c.coboosting_ods_eta,
                                                             tau, ods_rng),
                          grad_clip=10.0, precision=cfg.precision)
        scheduler.step()
        history.append({"epoch": epoch + 1, "pool": len(pool), **gen_diag, **kd_diag,
                        "weights": weights.cpu().tolist()})
        if cfg.progress and ((epoch + 1) % log_every == 0 or epoch + 1 == g.gen_epochs):
            log(INFO, "coboosting epoch %d/%d: pool %d, hard CE %.3f, adv %.3f, teacher acc "
                "%.2f, KD loss %.4f, agreement %.2f, ensemble weights %s", epoch + 1,
                g.gen_epochs, len(pool), gen_diag["ce"], gen_diag["adv"],
                gen_diag["teacher_accuracy"], kd_diag["kd_loss"], kd_diag["agreement"],
                [round(v, 3) for v in weights.cpu().tolist()])
    diagnostics = {"epochs": history, "weight_history": weight_history,
                   "wall_time_s": time.perf_counter() - start,
                   "final_weights": weights.cpu().tolist(),
                   "final_agreement": history[-1]["agreement"]}
    return finish(inp, "coboosting", student, pool.images[-1], pool.targets[-1], diagnostics)
