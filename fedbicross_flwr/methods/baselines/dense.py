"""DENSE (Zhang et al., NeurIPS 2022), reference code zj-jayzhang/DENSE (read, not copied).

Each of ``gen-epochs`` epochs:

1. data generation: the generator is re-initialised, and Adam (``gen-lr``, betas 0.5/0.999)
   trains it and its latent batch for ``gen-steps`` steps on
   ``gen-bn-weight * R_BN + gen-ce-weight * CE(T(x), y) + gen-adv-weight * L_adv`` where T is
   the mean-logit ensemble of all clients, R_BN the DeepInversion BN prior summed over the BN
   layers of ALL clients, y random targets, and L_adv = -mean_b m_b KL(T(x_b) || S(x_b)) with
   m_b = 1 only where the student's and the ensemble's argmax DISAGREE (temperature 1);
   the lowest-loss batch joins the synthetic pool;
2. model distillation: one pass over the whole pool, SGD (``gen-kd-lr``, momentum 0.9) on the
   KL at ``dense-kd-temperature`` (reference README: T = 20).

Reference defaults: 200 epochs, g_steps 30, lr_g 1e-3, nz 256, batch 256, bn = oh = adv = 1,
KD lr 0.01 (Co-Boosting's re-implementation; DENSE's README uses 0.005), T 20.
Deviations: the pool keeps float tensors (the reference stores PNGs) and no crop/flip
augmentation is applied (flips change the meaning of digits and of some medical images); the
student is in eval mode while the generator trains (as in Co-Boosting's re-implementation).
"""

from __future__ import annotations

import time
from logging import INFO

import torch

from ...distill.utils import derive_seed
from ...logging_utils import log
from ..base import MethodInput, MethodOutput
from .common import finish
from .config import DenseConfig, GeneratorConfig
from .generator import (
    SyntheticPool,
    ensemble_logits,
    generator_method_start,
    kd_pass,
    member_logits,
    train_generator_round,
)


def dense(inp: MethodInput) -> MethodOutput:
    """DENSE server stage: one global model for every client."""
    cfg = inp.cfg
    g, d = GeneratorConfig.of(cfg), DenseConfig.of(cfg)
    start = time.perf_counter()
    members, student, generator, settings = generator_method_start(
        inp, 201, bn_weight=g.gen_bn_weight, bn_reduction="sum", hard_power=None,
        adv_masked=True, adv_tau=1.0, grad_clip=None)
    optimizer = torch.optim.SGD(student.parameters(), lr=g.gen_kd_lr, momentum=0.9)
    pool = SyntheticPool()
    history: list[dict[str, float]] = []
    log_every = max(1, g.gen_epochs // 10)
    for epoch in range(g.gen_epochs):
        images, targets, gen_diag = train_generator_round(
            generator, members, student, settings, derive_seed(cfg.seed, 202, epoch))
        with torch.no_grad():  # the ensemble is fixed: its logits are computed once per image
            pool.add(images, targets, ensemble_logits(member_logits(members, images)))
        kd_diag = kd_pass(student, optimizer, pool, g.gen_batch, d.dense_kd_temperature,
                          derive_seed(cfg.seed, 203, epoch), precision=cfg.precision)
        history.append({"epoch": epoch + 1, "pool": len(pool), **gen_diag, **kd_diag})
        if cfg.progress and ((epoch + 1) % log_every == 0 or epoch + 1 == g.gen_epochs):
            log(INFO, "dense epoch %d/%d: pool %d, CE %.3f, R_BN %.3f, adv %.3f, teacher acc "
                "%.2f, KD loss %.4f, student-teacher agreement %.2f", epoch + 1, g.gen_epochs,
                len(pool), gen_diag["ce"], gen_diag["bn"], gen_diag["adv"],
                gen_diag["teacher_accuracy"], kd_diag["kd_loss"], kd_diag["agreement"])
    diagnostics = {"epochs": history, "wall_time_s": time.perf_counter() - start,
                   "final_agreement": history[-1]["agreement"],
                   "final_teacher_accuracy": history[-1]["teacher_accuracy"]}
    return finish(inp, "dense", student, pool.images[-1], pool.targets[-1], diagnostics)
