"""FedISCA (Kang et al., 2023), reference code myeongkyunkang/FedISCA (read, not copied).

One ensemble of ALL clients; each of ``fedisca-epochs`` server epochs e (0, the default:
``server-epochs``, FedBiCross's budget, so that both run at the same E, T and B):

1. DeepInversion from fresh N(0, 1) noise, keeping the whole trajectory x^(1..T) (the FedBiCross
   synthesis, :func:`~..fedbicross.synthesis.synthesize_trajectory`, with the same keys:
   synth-steps, synth-batch, synth-lr, tv-weight, bn-weight, bn-reduction, ensemble, jitter);
2. noise adaptation: the noise-adapted copy's BN statistics are updated by forwarding the
   trajectory in reverse order (:func:`~..fedbicross.noise_adapt.noise_adapted_copy`, beta =
   ``noise-momentum``). As in the reference, ONE adapted copy lives through all epochs: each
   epoch continues from the previous epoch's adapted statistics;
3. KD: one SGD step per trajectory step t = 0..T-1 (in order; ``kd-batch`` < B: B / kd-batch
   steps on consecutive slices of the batch) on
   alpha_t KL(F(x^t) || S) + (1 - alpha_t) KL(F~(x^t) || S), alpha_t = t / T, at temperature
   ``kd-temperature`` (reference: 20), SGD ``fedisca-lr`` (1e-3), momentum 0.9, weight decay
   5e-4, x0.1 at 50% and 75% of the epochs; the student starts at random (reference).

Reference code choices available through the shared keys: ``ensemble='logit'``,
``bn-reduction='sum'``, ``noise-teacher-mode='train'`` (the reference's noise-adapted copy stays
in train mode). The defaults are the FedBiCross paper's, so that FedISCA and FedBiCross
(which builds on FedISCA) share the synthesis and differ in what the paper adds: clustering,
the bi-level cross-cluster weights (with their 80/20 train/validation split of each batch).
Deviation: the teachers' soft labels are computed once per epoch with frozen BN buffers (the
reference's train-mode copy keeps drifting while it labels).
"""

from __future__ import annotations

import time
from logging import INFO

import torch

from ...distill.config import SynthesisSettings
from ...distill.losses import kd_loss
from ...distill.noise_adapt import noise_adapted_copy, teacher_soft_labels
from ...distill.schedule import step_schedule
from ...distill.synthesis import EnsembleTeacher, synthesize_trajectory
from ...distill.utils import derive_seed, full_precision
from ...logging_utils import log
from ...training import autocast
from ..base import MethodInput, MethodOutput
from .common import client_models, finish, initial_student
from .config import FedISCAConfig


def fedisca(inp: MethodInput) -> MethodOutput:
    """FedISCA server stage: one global model for every client."""
    cfg = inp.cfg
    start = time.perf_counter()
    s, f = SynthesisSettings.of(cfg), FedISCAConfig.of(cfg)
    members = client_models(inp)
    student = initial_student(inp, tag=101)
    optimizer = torch.optim.SGD(student.parameters(), lr=f.fedisca_lr, momentum=0.9,
                                weight_decay=5e-4)
    adapted = members  # the noise-adapted copy starts from the clients' statistics
    history: list[dict] = []
    times = {"synthesis": 0.0, "noise_adaptation": 0.0, "soft_labels": 0.0, "kd": 0.0}
    images = labels = None
    epochs = f.fedisca_epochs or s.server_epochs  # 0: FedBiCross's budget
    for epoch in range(epochs):
        lr = step_schedule(epoch, epochs, f.fedisca_lr, (0.5, 0.75))
        for group in optimizer.param_groups:
            group["lr"] = lr
        tag = f"fedisca epoch {epoch + 1}/{epochs}"
        t0 = time.perf_counter()
        trajectory, labels, synth_diag = synthesize_trajectory(
            members, inp.num_classes, inp.in_channels, s, derive_seed(cfg.seed, 102, epoch),
            inp.device, progress=cfg.progress, tag=tag)  # (T, B, C_in, H, W), (B,)
        t1 = time.perf_counter()
        adapted = noise_adapted_copy(adapted, trajectory, s.noise_momentum, s.noise_teacher_mode,
                                     s.precision, cutoff=s.noise_ema_cutoff,
                                     compile_forwards=s.compile_all)
        t2 = time.perf_counter()
        probs_f = teacher_soft_labels(EnsembleTeacher(members, s.ensemble, "eval"), trajectory,
                                      s.kd_temperature, s.label_chunk, s.precision,
                                      compile_forwards=s.compile_all)  # (T, B, C)
        probs_fn = teacher_soft_labels(EnsembleTeacher(adapted, s.ensemble, s.noise_teacher_mode),
                                       trajectory, s.kd_temperature, s.label_chunk, s.precision,
                                       compile_forwards=s.compile_all)
        t3 = time.perf_counter()
        student.train()
        steps, batch = trajectory.shape[:2]
        kd_batch = s.kd_batch or batch  # kd-batch < B: B / kd-batch KD steps per step t
        step_losses = []  # on the device: no host sync per KD step
        for t in range(steps):
            alpha = t / steps  # weight of the original teacher, 0 -> 1 (reference)
            for lo in range(0, batch, kd_batch):
                part = slice(lo, lo + kd_batch)
                with autocast(inp.device, s.precision):
                    logits = full_precision(student(trajectory[t, part]))
                loss = kd_loss(logits, probs_fn[t, part], probs_f[t, part], 1.0 - alpha, s.kd_temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_losses.append(loss.detach())
        losses = torch.stack(step_losses).tolist()
        t4 = time.perf_counter()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += seconds
        with torch.no_grad():
            student.eval()
            final = student(trajectory[-1]).argmax(dim=1)
            student_acc = (final == probs_f[-1].argmax(dim=1)).float().mean().item()
        history.append({"epoch": epoch + 1, "lr": lr, "kd_loss_first": losses[0],
                        "kd_loss_last": losses[-1], "kd_loss_mean": sum(losses) / len(losses),
                        "student_teacher_agreement_on_final": student_acc,
                        "teacher_accuracy": synth_diag["teacher_accuracy"],
                        "teacher_entropy": synth_diag["teacher_entropy"],
                        "final_ce": synth_diag["ce"][-1], "final_bn": synth_diag["bn"][-1]})
        log(INFO, "%s: teacher accuracy on targets %.2f, KD loss %.4f -> %.4f, student agrees "
            "with the teacher on x^(T) %.2f", tag, synth_diag["teacher_accuracy"], losses[0],
            losses[-1], student_acc)
        images = trajectory[-1, :16].detach().cpu()
        del trajectory, probs_f, probs_fn
    diagnostics = {"epochs": history, "stage_times_s": times,
                   "wall_time_s": time.perf_counter() - start,
                   "final_teacher_accuracy": history[-1]["teacher_accuracy"],
                   "final_agreement": history[-1]["student_teacher_agreement_on_final"]}
    return finish(inp, "fedisca", student, images, labels, diagnostics)
