"""Shared machinery of the generator-based baselines (DENSE, Co-Boosting, DAFL).

* :class:`Generator`: the DCGAN-style generator of DAFL / DENSE / Co-Boosting (linear -> BN ->
  2 x (upsample, 3x3 conv, BN, LeakyReLU) -> 3x3 conv), for 28x28 images (7 -> 14 -> 28). Its
  output is always in the models' normalised input space (mean 0.5, std 0.5).
* losses: BN-statistics prior (DeepInversion hooks, :class:`~fedbicross_flwr.distill.losses.BNStatsHook`),
  plain or hard-sample CE, the adversarial student-ensemble KL with DENSE's disagreement mask,
  DAFL's information-entropy and activation losses.
* :func:`train_generator_round`: one generator round of DENSE / Co-Boosting (re-initialised
  generator and latent, Adam, keep the lowest-loss batch).
* :class:`SyntheticPool` and :func:`kd_pass`: the growing pool and one KD pass over it.

Teachers are ensembles of the frozen client models in eval mode; their output is the
(weighted) mean of the member LOGITS, as in all three reference codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...distill.losses import BNStatsHook, kd_kl
from ...distill.utils import cpu_generator, full_precision
from ...training import autocast
from ..base import MethodInput
from .common import client_models, initial_student
from .config import GeneratorConfig


class Generator(nn.Module):
    """DCGAN-style generator of DAFL / DENSE / Co-Boosting.

    Parameters
    ----------
    latent : int
        Size of z.
    out_channels : int
        Image channels.
    image_size : int
        Output height = width (divisible by 4; 28 for MedMNIST).
    ngf : int
        Base width (64 in all references: 128 channels at 7x7, 64 at 28x28).
    style : str
        'dense' (DENSE, Co-Boosting): sigmoid pixels in [0, 1], mapped here to the normalised
        space (x - 0.5) / 0.5. 'dafl': tanh followed by a non-affine BatchNorm (DAFL's output
        layer), whose output is used as the normalised image directly.
    """

    def __init__(self, latent: int, out_channels: int, image_size: int = 28, ngf: int = 64,
                 style: str = "dense") -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        if style not in ("dense", "dafl"):
            raise ValueError(f"style must be 'dense' or 'dafl', got {style!r}")
        self.style = style
        self.init_size = image_size // 4
        eps = 0.8 if style == "dafl" else 1e-5  # DAFL's BatchNorm2d(c, 0.8) sets eps = 0.8
        self.fc = nn.Linear(latent, 2 * ngf * self.init_size**2)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=style == "dafl"),
            nn.BatchNorm2d(2 * ngf, eps=eps),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=style == "dafl"),
            nn.BatchNorm2d(ngf, eps=eps),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, out_channels, 3, padding=1),
        )
        self.out_bn = nn.BatchNorm2d(out_channels, affine=False) if style == "dafl" else None

    def forward(self, z: Tensor) -> Tensor:
        """(B, latent) -> (B, C, H, W) images in the normalised input space."""
        h = self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size)
        h = self.blocks(h)
        if self.out_bn is not None:
            return self.out_bn(torch.tanh(h))
        return (torch.sigmoid(h) - 0.5) / 0.5

    def reset(self, generator: torch.Generator) -> None:
        """DENSE / Co-Boosting re-initialisation before each round: N(0, 0.02) weights, zero
        biases, BN scales N(1, 0.02), drawn from the given seeded CPU generator.
        """
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.BatchNorm2d) and module.affine:
                    module.weight.copy_(1 + torch.randn(module.weight.shape, generator=generator)
                                        * 0.02)
                    module.bias.zero_()


# --- ensemble teacher ---------------------------------------------------------------------------
def member_logits(members: Sequence[nn.Module], x: Tensor) -> Tensor:
    """(N, B, C) float32 logits of every member (gradients flow to ``x`` if it needs them)."""
    return torch.stack([full_precision(m(x)) for m in members])


def ensemble_logits(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """(B, C) weighted mean of member logits, sum_i w_i l_i / sum_i w_i (Co-Boosting's
    WEnsemble; plain mean when ``weights`` is None: DENSE, DAFL).
    """
    if weights is None:
        return logits.mean(dim=0)
    w = weights.to(logits.dtype).view(-1, 1, 1)
    return (w * logits).sum(dim=0) / w.sum()


# --- losses ---------------------------------------------------------------------------------------
def disagreement_mask(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(B,) bool, True where the student's and the ensemble's argmax differ (DENSE)."""
    return student_logits.argmax(dim=1) != teacher_logits.argmax(dim=1)


def per_sample_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """(B,) tau^2 * KL(softmax(t / tau) || softmax(s / tau)) per sample."""
    log_q = F.log_softmax(student_logits / tau, dim=1)
    p = F.softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_q, p, reduction="none").sum(dim=1) * tau**2


def adversarial_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float,
                     masked: bool) -> Tensor:
    """-(1/B) sum_b m_b KL_b: the generator maximises the student-ensemble divergence.

    ``masked=True`` (DENSE): m_b = 1 only where the argmax of student and ensemble differ;
    ``masked=False`` (Co-Boosting): every sample counts.
    """
    kl = per_sample_kl(student_logits, teacher_logits, tau)  # (B,)
    if masked:
        kl = kl * disagreement_mask(student_logits, teacher_logits).to(kl.dtype)
    return -kl.mean()


def hard_sample_ce(teacher_logits: Tensor, targets: Tensor, power: float) -> Tensor:
    """Co-Boosting's hard-sample CE: mean_b (1 - p_b,y)^power * CE_b, p detached."""
    ce = F.cross_entropy(teacher_logits, targets, reduction="none")  # (B,)
    p_y = F.softmax(teacher_logits, dim=1).gather(1, targets.view(-1, 1)).squeeze(1).detach()
    return ((1.0 - p_y) ** power * ce).mean()


def information_entropy_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's class-balance term sum_c pbar_c log10 pbar_c, pbar = batch-mean softmax (it is
    minimised, i.e. the entropy of the mean prediction is maximised; log10 as in DAFL's code).
    """
    mean_p = F.softmax(teacher_logits, dim=1).mean(dim=0)  # (C,)
    return (mean_p * torch.log10(mean_p.clamp(min=1e-12))).sum()


class PenultimateHook:
    """Collects the input of each model's last ``nn.Linear`` (the pooled features; DAFL's
    activation loss is -mean |features|). Hooks are removed on exit.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.layers = [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]
                       for model in models]
        self.features: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> PenultimateHook:
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(
                lambda _m, inputs, _o: self.features.append(full_precision(inputs[0]))))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def activation_loss(self) -> Tensor:
        """-(mean over members of mean |f|) of the features collected since the last call."""
        loss = -torch.stack([f.abs().mean() for f in self.features]).mean()
        self.features = []
        return loss


# --- one DENSE / Co-Boosting generator round ---------------------------------------------------
@dataclass(frozen=True)
class RoundSettings:
    """Loss weights and variants of one generator round.

    ``bn_weight`` scales the BN prior summed over the BN layers of the members, reduced over
    members by ``bn_reduction`` ('sum': DENSE's hooks on every member; 'mean': Co-Boosting
    divides by N). ``hard_power`` None is plain CE (DENSE), else Co-Boosting's hard-sample CE.
    ``adv_masked``/``adv_tau``: DENSE (True, 1) or Co-Boosting (False, 3). ``grad_clip``:
    Co-Boosting clips the generator's gradient norm at 10; None: no clipping (DENSE).
    """

    steps: int
    batch: int
    lr: float
    latent: int
    bn_weight: float
    ce_weight: float
    adv_weight: float
    bn_reduction: str = "sum"
    hard_power: float | None = None
    adv_masked: bool = True
    adv_tau: float = 1.0
    grad_clip: float | None = None
    precision: str = "fp32"


def generator_method_start(inp: MethodInput, tag: int, **variant: Any
                           ) -> tuple[list[nn.Module], nn.Module, Generator, RoundSettings]:
    """What DENSE and Co-Boosting start from: the frozen client models, the student (seeded
    by ``tag``), a fresh generator and the round settings of the ``gen-*`` keys.

    ``variant`` holds the method's own :class:`RoundSettings` fields (``bn_weight``,
    ``bn_reduction``, ``hard_power``, ``adv_masked``, ``adv_tau``, ``grad_clip``).
    """
    cfg, g = inp.cfg, GeneratorConfig.of(inp.cfg)
    members = client_models(inp)
    student = initial_student(inp, tag=tag)
    generator = Generator(g.gen_latent, inp.in_channels).to(inp.device)
    settings = RoundSettings(steps=g.gen_steps, batch=g.gen_batch, lr=g.gen_lr,
                             latent=g.gen_latent, ce_weight=g.gen_ce_weight,
                             adv_weight=g.gen_adv_weight, precision=cfg.precision, **variant)
    return members, student, generator, settings


def train_generator_round(
    generator: Generator,
    members: Sequence[nn.Module],
    student: nn.Module,
    settings: RoundSettings,
    seed: int,
    member_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """One DENSE / Co-Boosting synthesis round; returns the lowest-loss batch.

    The generator is re-initialised and a fresh latent z ~ N(0, I) and random targets y are
    drawn; Adam (betas 0.5, 0.999) updates generator AND z for ``steps`` iterations on

        L = bn_weight * R_BN(x) + ce_weight * CE(T(x), y) + adv_weight * L_adv(S(x), T(x))

    with x = G(z), T the (weighted) logit-mean ensemble and S the current student (both frozen
    in eval mode; only G and z receive gradients).

    Parameters
    ----------
    generator : Generator
        Trained in train mode (BN on batch statistics), left in train mode.
    members : Sequence[nn.Module]
        Frozen client models in eval mode.
    student : nn.Module
        The global model; put in eval mode here, its train/eval flags restored afterwards.
    settings : RoundSettings
        Loss weights and variants.
    seed : int
        Seed of the re-initialisation, z and y (CPU draws: same numbers on every device).
    member_weights : Tensor, optional
        (N,) Co-Boosting ensemble weights (constants here).

    Returns
    -------
    images : Tensor
        (B, C_in, H, W) the batch with the lowest total loss seen (detached).
    targets : Tensor
        (B,) int64 targets y.
    diagnostics : dict
        Final unweighted loss terms 'bn', 'ce', 'adv', 'best_loss' and 'teacher_accuracy'
        (share of the kept batch that the ensemble assigns to its target).
    """
    device = next(generator.parameters()).device
    rng = cpu_generator(seed)
    generator.reset(rng)
    generator.train()
    num_classes = _num_classes(members[0])
    z = torch.randn((settings.batch, settings.latent), generator=rng).to(device).requires_grad_()
    targets = torch.randint(0, num_classes, (settings.batch,), generator=rng).to(device)
    params = [*generator.parameters(), z]
    optimizer = torch.optim.Adam(params, lr=settings.lr, betas=(0.5, 0.999))
    student_flags = [(m, m.training) for m in student.modules()]
    student.eval()
    best_loss, best_images = math.inf, None
    terms = {"bn": 0.0, "ce": 0.0, "adv": 0.0}
    use_bn = settings.bn_weight > 0
    try:
        with BNStatsHook(members if use_bn else []) as bn_hook:
            for _ in range(settings.steps):
                bn_hook.reset()
                with autocast(device, settings.precision):
                    x = generator(z)  # (B, C_in, H, W)
                    t_logits = ensemble_logits(member_logits(members, x), member_weights)
                    s_logits = full_precision(student(x))
                x = full_precision(x)
                r_bn = bn_hook.loss(settings.bn_reduction) if use_bn else x.new_zeros(())
                if settings.hard_power is None:
                    ce = F.cross_entropy(t_logits, targets)
                else:
                    ce = hard_sample_ce(t_logits, targets, settings.hard_power)
                adv = adversarial_loss(s_logits, t_logits, settings.adv_tau, settings.adv_masked)
                loss = settings.bn_weight * r_bn + settings.ce_weight * ce + settings.adv_weight * adv
                if loss.item() < best_loss:  # references keep the batch with the lowest cost
                    best_loss, best_images = loss.item(), x.detach().clone()
                optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=params)
                if settings.grad_clip is not None:
                    nn.utils.clip_grad_norm_(list(generator.parameters()), settings.grad_clip)
                optimizer.step()
                terms = {"bn": r_bn.item(), "ce": ce.item(), "adv": adv.item()}
    finally:
        for module, flag in student_flags:
            module.training = flag
    with torch.no_grad():
        t_best = ensemble_logits(member_logits(members, best_images), member_weights)  # type: ignore[arg-type]
        accuracy = (t_best.argmax(dim=1) == targets).float().mean().item()
    return best_images, targets, {**terms, "best_loss": best_loss, "teacher_accuracy": accuracy}  # type: ignore[return-value]


def _num_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


# --- the synthetic pool and KD over it -----------------------------------------------------------
class SyntheticPool:
    """Growing pool of synthetic batches (DENSE / Co-Boosting keep every round's best batch).

    Stores images in the normalised space, their targets and, optionally, fixed teacher logits
    (DENSE's teacher never changes, so its logits are computed once per image).
    """

    def __init__(self) -> None:
        self.images: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.teacher_logits: list[Tensor | None] = []

    def add(self, images: Tensor, targets: Tensor, teacher_logits: Tensor | None = None) -> None:
        """Append one batch (and its teacher logits, if cached) to the pool."""
        self.images.append(images.detach())
        self.targets.append(targets.detach())
        self.teacher_logits.append(None if teacher_logits is None else teacher_logits.detach())

    def __len__(self) -> int:
        return sum(len(x) for x in self.images)

    def batches(self, batch_size: int, seed: int
                ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Shuffled mini-batches (images, targets, teacher logits or None) over the whole pool."""
        images = torch.cat(self.images)
        targets = torch.cat(self.targets)
        logits = (torch.cat(self.teacher_logits)  # type: ignore[arg-type]
                  if all(t is not None for t in self.teacher_logits) else None)
        order = torch.randperm(len(images), generator=cpu_generator(seed)).to(images.device)
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            yield images[idx], targets[idx], None if logits is None else logits[idx]


def kd_pass(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    pool: SyntheticPool,
    batch_size: int,
    tau: float,
    seed: int,
    teacher: Callable[[Tensor], Tensor] | None = None,
    perturb: Callable[[Tensor], Tensor] | None = None,
    grad_clip: float | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """One KD epoch over the pool: SGD on tau^2 KL(softmax(T/tau) || softmax(S/tau)).

    Parameters
    ----------
    student : nn.Module
        Trained in train mode.
    optimizer : torch.optim.Optimizer
        The student's optimizer.
    pool : SyntheticPool
        Synthetic data; its cached teacher logits are used when ``teacher`` is None.
    batch_size : int
        KD batch size.
    tau : float
        Temperature.
    seed : int
        Shuffle seed.
    teacher : callable, optional
        x -> (B, C) teacher logits, computed per batch (Co-Boosting's weights change).
    perturb : callable, optional
        x -> x' applied before the forwards (Co-Boosting's ODS).
    grad_clip : float, optional
        Clip the student's gradient norm (Co-Boosting: 10).
    precision : str
        'bf16' for autocast forwards.

    Returns
    -------
    dict
        'kd_loss' (mean over batches) and 'agreement' (share of samples where the student's
        argmax equals the teacher's).
    """
    device = next(student.parameters()).device
    student.train()
    total, agree, count, batches = 0.0, 0, 0, 0
    for images, _targets, cached in pool.batches(batch_size, seed):
        if perturb is not None:
            images = perturb(images)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(images)
        else:
            t_logits = cached  # type: ignore[assignment]
        with autocast(device, precision):
            s_logits = full_precision(student(images))
        loss = kd_kl(s_logits, F.softmax(t_logits / tau, dim=1), tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        total += loss.item()
        batches += 1
        agree += (s_logits.argmax(dim=1) == t_logits.argmax(dim=1)).sum().item()  # type: ignore[assignment]
        count += len(images)
    return {"kd_loss": total / max(batches, 1), "agreement": agree / max(count, 1)}
