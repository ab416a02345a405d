"""DAFL (Chen et al., ICCV 2019), reference code huawei-noah DAFL (read, not copied).

The teacher is the mean-logit ensemble of all clients (DAFL distils one teacher; the one-shot
FL papers use the client ensemble). Each of ``dafl-epochs`` x ``dafl-iterations`` steps draws
z ~ N(0, I) (``dafl-batch`` x ``dafl-latent``), generates x = G(z) and updates generator and
student TOGETHER:

    L_G = dafl-ce-weight * CE(T(x), argmax T(x))          (one-hot loss)
        + dafl-ie-weight * sum_c pbar_c log10 pbar_c       (information entropy, class balance)
        + dafl-act-weight * (-mean |features of T(x)|)     (activation loss, pooled features)
    L_S = KL(softmax(T(x)) || softmax(S(x)))               (on x detached, temperature 1)

Adam for G (``dafl-gen-lr``), SGD for S (``dafl-student-lr``, momentum 0.9, weight decay 5e-4,
x0.1 at 40% and 80% of the epochs). Defaults: the reference's CIFAR-10 recipe (ResNet-18
student): 2000 epochs x 120 iterations, batch 1024, lr_G 0.02, lr_S 0.1, latent 1000,
oh 0.05, ie 5, a 0.01. Generator: DAFL's (tanh + non-affine BN output, BN eps 0.8).
"""

from __future__ import annotations

import time
from logging import INFO

import torch
import torch.nn.functional as F

from ...distill.losses import kd_kl
from ...distill.schedule import step_schedule
from ...distill.utils import cpu_generator, derive_seed, full_precision
from ...logging_utils import log
from ...training import autocast
from ..base import MethodInput, MethodOutput
from .common import client_models, finish, initial_student
from .config import DAFLConfig
from .generator import (
    Generator,
    PenultimateHook,
    ensemble_logits,
    information_entropy_loss,
    member_logits,
)


def dafl(inp: MethodInput) -> MethodOutput:
    """DAFL server stage: one global model for every client."""
    cfg = inp.cfg
    d = DAFLConfig.of(cfg)
    start = time.perf_counter()
    members = client_models(inp)
    student = initial_student(inp, tag=401)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, 402))
        generator = Generator(d.dafl_latent, inp.in_channels, style="dafl").to(inp.device)
    gen_opt = torch.optim.Adam(generator.parameters(), lr=d.dafl_gen_lr)
    stu_opt = torch.optim.SGD(student.parameters(), lr=d.dafl_student_lr, momentum=0.9,
                              weight_decay=5e-4)
    rng = cpu_generator(derive_seed(cfg.seed, 403))
    history: list[dict[str, float]] = []
    log_every = max(1, d.dafl_epochs // 10)
    generator.train()
    student.train()
    with PenultimateHook(members) as features:
        for epoch in range(d.dafl_epochs):
            for group in stu_opt.param_groups:
                group["lr"] = step_schedule(epoch, d.dafl_epochs, d.dafl_student_lr, (0.4, 0.8))
            sums = {"ce": 0.0, "ie": 0.0, "act": 0.0, "kd": 0.0, "agreement": 0.0}
            for _ in range(d.dafl_iterations):
                z = torch.randn((d.dafl_batch, d.dafl_latent), generator=rng).to(inp.device)
                with autocast(inp.device, cfg.precision):
                    x = generator(z)  # (B, C_in, H, W)
                    t_logits = ensemble_logits(member_logits(members, x))  # (B, C)
                    s_logits = full_precision(student(x.detach()))
                act = features.activation_loss()
                ce = F.cross_entropy(t_logits, t_logits.argmax(dim=1))
                ie = information_entropy_loss(t_logits)
                loss_g = d.dafl_ce_weight * ce + d.dafl_ie_weight * ie + d.dafl_act_weight * act
                kd = kd_kl(s_logits, F.softmax(t_logits.detach(), dim=1), 1.0)
                gen_opt.zero_grad(set_to_none=True)
                stu_opt.zero_grad(set_to_none=True)
                (loss_g + kd).backward()
                gen_opt.step()
                stu_opt.step()
                agreement = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean().item()
                for key, value in (("ce", ce), ("ie", ie), ("act", act), ("kd", kd)):
                    sums[key] += value.item()
                sums["agreement"] += agreement
            row = {"epoch": epoch + 1, **{k: v / d.dafl_iterations for k, v in sums.items()}}
            history.append(row)
            if cfg.progress and ((epoch + 1) % log_every == 0 or epoch + 1 == d.dafl_epochs):
                log(INFO, "dafl epoch %d/%d: one-hot %.3f, info-entropy %.3f, activation %.3f, "
                    "KD %.4f, student-teacher agreement %.2f", epoch + 1, d.dafl_epochs,
                    row["ce"], row["ie"], row["act"], row["kd"], row["agreement"])
    generator.eval()
    with torch.no_grad():
        z = torch.randn((16, d.dafl_latent), generator=rng).to(inp.device)
        images = generator(z)
        labels = ensemble_logits(member_logits(members, images)).argmax(dim=1)
    counts = torch.bincount(labels, minlength=inp.num_classes).tolist()
    diagnostics = {"epochs": history, "wall_time_s": time.perf_counter() - start,
                   "final_agreement": history[-1]["agreement"],
                   "final_teacher_class_counts_16": counts}
    return finish(inp, "dafl", student, images, labels, diagnostics)
