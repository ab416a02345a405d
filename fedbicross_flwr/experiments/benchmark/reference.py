"""Reference-style server steps: written the way public codes of this family do it.

DeepInversion / FedISCA / DENSE-style code loops over the ensemble members in Python, runs in
float32 with the teachers' parameters still requiring gradients (so ``loss.backward()`` also
forms their weight gradients), re-registers BN hooks at every step, and recomputes the frozen
teachers' outputs at every KD use. These functions do exactly that, on purpose, as the
baseline of the benchmark; they are independent re-implementations of the same mathematics as
:mod:`fedbicross_flwr.distill.synthesis` and :mod:`fedbicross_flwr.fedbicross.bilevel`, so
the benchmark can also check that the fast path computes the same numbers.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...fedbicross.bilevel import outer_update
from ...fedbicross.config import FedBiCrossSettings


def _ensemble_log_probs(members: Sequence[nn.Module], x: Tensor, ensemble: str,
                        tau: float = 1.0) -> Tensor:
    """Log of the ensemble teacher, one member after the other: (B, C)."""
    logits = [member(x) for member in members]  # n x (B, C)
    if ensemble == "logit":
        return F.log_softmax(sum(logits) / len(logits) / tau, dim=1)
    probs = sum(F.softmax(z / tau, dim=1) for z in logits) / len(logits)  # (B, C)
    return torch.log(probs)  # type: ignore[arg-type]


def reference_synthesis_loss(
    members: Sequence[nn.Module], x: Tensor, labels: Tensor, offset: tuple[int, int],
    settings: FedBiCrossSettings,
) -> tuple[Tensor, Tensor]:
    """DeepInversion loss (Eq. 2) the reference way; returns (loss, detached (3,) CE, R_BN, R_TV).

    Parameters
    ----------
    members : Sequence[nn.Module]
        Ensemble members (float32, eval mode).
    x : Tensor
        (B, C_in, H, W) images, requires grad.
    labels : Tensor
        (B,) targets.
    offset : tuple[int, int]
        Roll jitter (dy, dx).
    settings : FedBiCrossSettings
        Uses tv_weight, bn_weight, bn_reduction, ensemble.
    """
    x_jit = torch.roll(x, shifts=offset, dims=(2, 3))  # (B, C_in, H, W)
    per_member_bn = []
    logits = []
    for member in members:
        member.eval()
        terms: list[Tensor] = []

        def hook(module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            a = inputs[0]  # (B, C_l, H, W)
            mean = a.mean(dim=[0, 2, 3])
            var = a.permute(1, 0, 2, 3).reshape(a.shape[1], -1).var(dim=1, unbiased=False)
            terms.append(torch.norm(mean - module.running_mean, 2)  # type: ignore[operator]
                         + torch.norm(var - module.running_var, 2))  # type: ignore[operator]

        handles = [m.register_forward_hook(hook) for m in member.modules()
                   if isinstance(m, nn.BatchNorm2d)]
        logits.append(member(x_jit))
        for handle in handles:
            handle.remove()
        per_member_bn.append(sum(terms))
    if settings.ensemble == "logit":
        log_p = F.log_softmax(sum(logits) / len(logits), dim=1)
    else:
        log_p = torch.log(sum(F.softmax(z, dim=1) for z in logits) / len(logits))  # type: ignore[arg-type]
    ce = F.nll_loss(log_p, labels)
    r_bn = sum(per_member_bn)
    if settings.bn_reduction == "mean":
        r_bn = r_bn / len(members)  # type: ignore[assignment]
    diff1 = x_jit[:, :, :, :-1] - x_jit[:, :, :, 1:]
    diff2 = x_jit[:, :, :-1, :] - x_jit[:, :, 1:, :]
    diff3 = x_jit[:, :, 1:, :-1] - x_jit[:, :, :-1, 1:]
    diff4 = x_jit[:, :, :-1, :-1] - x_jit[:, :, 1:, 1:]
    r_tv = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    loss = ce + settings.tv_weight * r_tv + settings.bn_weight * r_bn
    return loss, torch.stack([ce.detach(), r_bn.detach(), r_tv.detach()])  # type: ignore[union-attr]


def reference_synthesis_step(
    members: Sequence[nn.Module], x: Tensor, labels: Tensor, offset: tuple[int, int],
    settings: FedBiCrossSettings, optimizer: torch.optim.Optimizer,
) -> Tensor:
    """One Adam step on the images with a plain ``loss.backward()``; returns the (3,) terms."""
    loss, terms = reference_synthesis_loss(members, x, labels, offset, settings)
    optimizer.zero_grad()
    loss.backward()  # teachers' parameters require grad: their weight gradients are formed too
    optimizer.step()
    return terms


def _kd(student_logits: Tensor, noise_probs: Tensor, probs: Tensor, lam: float, tau: float) -> Tensor:
    log_q = F.log_softmax(student_logits / tau, dim=1)
    kl_noise = (noise_probs * (torch.log(noise_probs.clamp_min(1e-30)) - log_q)).sum(1).mean()
    kl = (probs * (torch.log(probs.clamp_min(1e-30)) - log_q)).sum(1).mean()
    return (lam * kl_noise + (1.0 - lam) * kl) * tau * tau


class ReferenceBilevel:
    """Online bi-level step (Eq. 7-8) the reference way, for K students.

    Parameters
    ----------
    students : list[nn.Module]
        G_1..G_K (float32), updated in place.
    teachers, noise_teachers : list[list[nn.Module]]
        Members of F_k and of the noise-adapted F~_k (eval mode), recomputed at every use.
    weights : Tensor
        (K, K) float64 current cross-cluster weights.
    settings : FedBiCrossSettings
        Uses tau, student_lr, student_momentum, student_weight_decay, weight_lr,
        hypergrad_norm, ensemble.
    """

    def __init__(self, students: list[nn.Module], teachers: list[list[nn.Module]],
                 noise_teachers: list[list[nn.Module]], weights: Tensor,
                 settings: FedBiCrossSettings) -> None:
        self.students = students
        self.teachers = teachers
        self.noise_teachers = noise_teachers
        self.weights = weights.clone()
        self.settings = settings
        self.momentum = [[None for _ in s.parameters()] for s in students]

    def _soft_labels(self, j: int, x: Tensor) -> tuple[Tensor, Tensor]:
        tau = self.settings.kd_temperature
        with torch.no_grad():
            for m in self.teachers[j] + self.noise_teachers[j]:
                m.eval()
            p = _ensemble_log_probs(self.teachers[j], x, self.settings.ensemble, tau).exp()
            pn = _ensemble_log_probs(self.noise_teachers[j], x, self.settings.ensemble, tau).exp()
        return pn, p

    def step(self, t: int, steps: int, images: Sequence[Tensor], train_idx: Tensor,
             val_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Step t of T; returns (K,) validation losses and the (K, K) hypergradients."""
        s = self.settings
        K = len(self.students)
        lam = 1.0 - t / steps
        new_weights = self.weights.clone()
        val_losses = torch.zeros(K, dtype=torch.float64)
        hypers = torch.zeros(K, K, dtype=torch.float64)
        for k, student in enumerate(self.students):
            params = list(student.parameters())
            start_buffers = {n: b.clone() for n, b in student.named_buffers()}
            grads, buffers = [], []
            for j in range(K):
                x = images[j][train_idx]
                pn, p = self._soft_labels(j, x)  # teachers recomputed at every KD use
                student.load_state_dict(start_buffers, strict=False)
                student.train()
                loss = _kd(student(x), pn, p, lam, s.kd_temperature)
                student.zero_grad()
                loss.backward()
                grads.append([q.grad.detach().clone() for q in params])  # type: ignore[union-attr]
                buffers.append({n: b.clone() for n, b in student.named_buffers()})
            w = self.weights[k].float()
            with torch.no_grad():
                for i, q in enumerate(params):
                    d = sum(w[j] * grads[j][i] for j in range(K)) + s.student_weight_decay * q
                    if s.student_momentum:
                        buf = self.momentum[k][i]
                        buf = d.clone() if buf is None else buf * s.student_momentum + d
                        self.momentum[k][i] = buf  # type: ignore[call-overload]
                        d = buf
                    q -= s.student_lr * d  # type: ignore[misc]
            # Validation at G' on a look-ahead copy (its BN update is thrown away).
            look_ahead = copy.deepcopy(student)
            look_ahead.load_state_dict(start_buffers, strict=False)
            look_ahead.train()
            xv = images[k][val_idx]
            pn, p = self._soft_labels(k, xv)
            val_loss = _kd(look_ahead(xv), pn, p, lam, s.kd_temperature)
            g_val = torch.autograd.grad(val_loss, list(look_ahead.parameters()))
            hyper = torch.stack([
                -s.student_lr * sum((gv * gj).sum() for gv, gj in zip(g_val, grads[j]))  # type: ignore[misc]
                for j in range(K)
            ]).double()
            hypers[k] = hyper
            val_losses[k] = val_loss.detach().double()
            if K > 1 and s.weights_mode == "bilevel":
                new_weights[k] = outer_update(self.weights[k], hyper, s.weight_lr,
                                              s.hypergrad_norm)
            with torch.no_grad():  # BN running statistics: w-weighted mixture of the sources
                for name, b in student.named_buffers():
                    if b.is_floating_point():
                        b.copy_(sum(w[j].to(b.dtype) * buffers[j][name] for j in range(K)))  # type: ignore[arg-type]
                    else:
                        b.copy_(buffers[0][name])
        self.weights = new_weights
        return val_losses, hypers
