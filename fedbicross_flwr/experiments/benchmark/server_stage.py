"""Benchmark of the FedBiCross server stage (synthesis, noise adaptation, soft labels, bi-level KD).

The real path is the library code that ``run_fedbicross`` calls (clustering excluded: it is a
one-off pass of M noise images). In the same process and on the same inputs, the
reference-style steps of :mod:`.reference` (member loop, teachers recomputed at each KD use,
float32) are timed and compared with the real path:

* synthesis: the DeepInversion loss terms and the gradient w.r.t. the images at x^(T);
* bi-level: one step t = ceil(T/2) from the same students, with the real path's stored soft
  labels against teachers recomputed by the reference: the student parameter updates, the
  validation losses and (float32 only) the new cross-cluster weights.

Relative errors are ||a - b|| / ||b||. float32 real vs float32 reference must agree within
``TIGHT_RTOL``; a bf16 real path within ``LOOSE_RTOL`` (bf16 keeps 8 significant bits).
Measured on ResNet-18, N=5, K=2, B=64 (docs/BENCHMARKS.md): float32 vs float32 up to 1.1e-3
(channels-last vs NCHW convolutions sum in another order, and a few ReLUs near zero flip
through 17 layers), bf16 vs float32 up to 9e-2 on the image gradient; the tolerances leave
a margin over those.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from ...distill.losses import BNStatsHook
from ...distill.noise_adapt import effective_steps, noise_adapted_copy, teacher_soft_labels
from ...distill.synthesis import (
    EnsembleTeacher,
    deepinversion_loss,
    loss_members,
    synthesis_start,
    synthesize_trajectory,
)
from ...distill.utils import derive_seed, preserved_modes, to_channels_last
from ...fedbicross.bilevel import OnlineBilevelTrainer, fixed_weights
from ...fedbicross.config import FedBiCrossSettings
from ...fedbicross.method import init_cluster_models
from ...keys.sections import TaskConfig
from ...model import build_resnet18
from ...training import resolve_device
from .hardware import count_flops, estimate_peak_flops, peak_memory_mib, reset_peak_memory, timed
from .reference import ReferenceBilevel, reference_synthesis_loss, reference_synthesis_step

TIGHT_RTOL = 5e-3
LOOSE_RTOL = 0.15
_MODELS = ("resnet18", "tiny")
_WIDTH = {f.name: f for f in fields(TaskConfig)}["model_width"]  # its range: the run config's
_DTYPES = ("bf16", "fp32")
_COMPILE_SCOPES = ("synthesis", "all")


class TinyNet(nn.Module):
    """Two conv-BN-ReLU blocks, global pooling, linear: a seconds-scale stand-in for tests."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C) logits of (B, C_in, H, W) images."""
        return self.fc(self.features(x).mean(dim=(2, 3)))


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark (N, K, B, T, device, dtype) and how.

    Attributes
    ----------
    num_clients, num_clusters, batch, steps : int
        N, K, B and T of the real run (clients assigned round-robin to clusters).
    ref_steps : int
        Timed steps of the reference-style path (synthesis per cluster, and bi-level).
    device : str
        'cpu', 'cuda' or 'cuda:<i>' (a device this machine has), or 'auto'.
    dtype : str
        'bf16' (autocast) or 'fp32' for the real path; the reference is always float32.
    model : str
        'resnet18' (paper) or 'tiny' (tests).
    width : int
        Base width w of the ResNet-18 (run-config ``model-width``; paper: 64).
    peak_tflops : float
        Device peak for the FLOP/s ratio; 0 estimates it (see ``estimate_peak_flops``).
    check : bool
        Run the reference comparison (timing of the reference needs it too).
    count : bool
        Count the FLOPs of one step (False: 'flops', 'achieved_flops_per_s' and 'peak' are
        left out of the report; a timing probe needs none of them).
    perturb : float
        Noise added to the reference's images (a test hook: the checks must then fail).
    """

    num_clients: int = 5
    num_clusters: int = 2
    batch: int = 64
    steps: int = 4
    ref_steps: int = 2
    device: str = "cpu"
    dtype: str = "bf16"
    model: str = "resnet18"
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 28
    width: int = 64
    seed: int = 0
    peak_tflops: float = 0.0
    check: bool = True
    count: bool = True
    warmup: bool = True
    perturb: float = 0.0
    compile: bool = False  # torch.compile the members inside synthesis (settings.compile)
    compile_scope: str = "synthesis"  # with compile: 'all' compiles every per-step loop

    def __post_init__(self) -> None:
        for name in ("num_clients", "num_clusters", "steps", "ref_steps", "in_channels", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch < 2 or self.num_classes < 2 or self.image_size < 4:
            raise ValueError("batch and num_classes must be >= 2, image_size >= 4")
        if self.num_clusters > self.num_clients:
            raise ValueError(f"num_clusters ({self.num_clusters}) > num_clients ({self.num_clients})")
        if self.model not in _MODELS or self.dtype not in _DTYPES:
            raise ValueError(f"model must be in {_MODELS}, dtype in {_DTYPES}")
        if self.compile_scope not in _COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be in {_COMPILE_SCOPES}, got {self.compile_scope!r}")
        low, high = _WIDTH.metadata["low"], _WIDTH.metadata["high"]
        if not low <= self.width <= high:
            raise ValueError(f"width must be in [{low:g}, {high:g}] (the run config's "
                             f"model-width), got {self.width}")
        resolve_device(self.device)  # ConfigError (a ValueError): not a device of this machine


@dataclass
class Check:
    """One equality check: the largest relative error over its quantities and the tolerance."""

    name: str
    errors: dict[str, float]
    rtol: float
    gating: dict[str, bool] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The largest gated relative error."""
        return max((e for n, e in self.errors.items() if self.gating.get(n, True)), default=0.0)

    @property
    def passed(self) -> bool:
        """Whether every error is finite and the gated ones are within ``rtol``."""
        return all(math.isfinite(e) for e in self.errors.values()) and self.max_error <= self.rtol


def rel_err(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor) in float64 (absolute error when that is zero).

    Loss values use ``floor = 1``: a KD loss near zero is a difference of nearly equal terms,
    so its relative error says little; below 1 the absolute error is used.
    """
    a, b = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    scale = max(float(b.norm()), floor)
    return float((a - b).norm() / scale) if scale > 0 else float((a - b).norm())


def make_clients(cfg: BenchConfig, device: torch.device) -> list[nn.Module]:
    """N seeded client models with realistic BN statistics (one train-mode pass on noise)."""
    models = []
    for i in range(cfg.num_clients):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, 100, i))
            model = (build_resnet18(cfg.in_channels, cfg.num_classes, cfg.width)
                     if cfg.model == "resnet18"
                     else TinyNet(cfg.in_channels, cfg.num_classes))
            calib = torch.randn(16, cfg.in_channels, cfg.image_size, cfg.image_size) * 0.5
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average: one pass sets the statistics
                m.reset_running_stats()
        model.train()
        with torch.no_grad():
            model(calib + 0.1 * i)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
        models.append(model.to(device).eval().requires_grad_(False))
    return models


def _settings(cfg: BenchConfig, dtype: str | None = None) -> FedBiCrossSettings:
    return FedBiCrossSettings(num_clusters=cfg.num_clusters, synth_steps=cfg.steps,
                              synth_batch=cfg.batch, seed=cfg.seed,
                              precision="bf16" if (dtype or cfg.dtype) == "bf16" else "fp32",
                              compile=cfg.compile, compile_scope=cfg.compile_scope)


def _student_factory(cfg: BenchConfig):
    if cfg.model == "resnet18":
        return lambda: build_resnet18(cfg.in_channels, cfg.num_classes, cfg.width)
    return lambda: TinyNet(cfg.in_channels, cfg.num_classes)


def _fp32_copies(models: list[nn.Module], grad: bool) -> list[nn.Module]:
    """Plain NCHW float32 copies; reference codes leave teachers' requires_grad on."""
    copies = [copy.deepcopy(m).float().to(memory_format=torch.contiguous_format) for m in models]
    for m in copies:
        m.requires_grad_(grad)
    return copies


def _real_synthesis_grad(members: list[nn.Module], x: Tensor, labels: Tensor,
                         offset: tuple[int, int], settings: FedBiCrossSettings
                         ) -> tuple[Tensor, Tensor]:
    """Loss terms and image gradient of one real-path synthesis step (no optimizer step)."""
    x = x.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    teacher = EnsembleTeacher(loss_members(members, settings), settings.ensemble, "eval")
    with preserved_modes(members), BNStatsHook(members) as hook:
        loss, terms = deepinversion_loss(teacher, hook, torch.roll(x, offset, (2, 3)), labels,
                                         settings)
        (grad,) = torch.autograd.grad(loss, [x])
    return terms, grad


def _ref_synthesis_grad(members: list[nn.Module], x: Tensor, labels: Tensor,
                        offset: tuple[int, int], settings: FedBiCrossSettings
                        ) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_(True)
    loss, terms = reference_synthesis_loss(members, x, labels, offset, settings)
    (grad,) = torch.autograd.grad(loss, [x])
    return terms, grad


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Time the real server stage and the reference-style steps; compare their numbers.

    Returns
    -------
    dict
        'config', 'real_ms' (per trajectory step: synthesis of all K clusters, noise
        adaptation, soft labels, bi-level step of all K targets, total), 'reference_ms' (same
        keys), 'speedup', 'images_per_s', 'flops', 'peak', 'memory', 'checks' (list of dicts
        with name, errors, rtol, passed) and 'checks_passed'.
    """
    device = resolve_device(cfg.device)
    K, T = cfg.num_clusters, cfg.steps
    settings = _settings(cfg)
    clients = make_clients(cfg, device)
    members = [[c for i, c in enumerate(clients) if i % K == k] for k in range(K)]
    factory = _student_factory(cfg)
    report: dict[str, Any] = {"config": asdict(cfg)}

    if cfg.warmup:  # kernel selection and allocator warm-up, not timed
        synthesize_trajectory(members[0], cfg.num_classes, cfg.in_channels,
                              replace(settings, synth_steps=1), cfg.seed, device,
                              image_size=cfg.image_size, progress=False)

    # --- real path: exactly what run_fedbicross does per server epoch ---------------------------
    reset_peak_memory(device)
    times = {"synthesis": 0.0, "noise_adaptation": 0.0, "soft_labels": 0.0, "bilevel": 0.0}
    trajectories, labels, teacher_probs, noise_probs, adapted_all = [], [], [], [], []
    for k in range(K):
        seed_k = derive_seed(cfg.seed, 3, 0, k)
        (traj, lab, _), dt = timed(lambda: synthesize_trajectory(
            members[k], cfg.num_classes, cfg.in_channels, settings, seed_k, device,
            image_size=cfg.image_size, progress=False), device)
        times["synthesis"] += dt
        adapted, dt = timed(lambda: noise_adapted_copy(members[k], traj, settings.noise_momentum,
                                                       settings.noise_teacher_mode,
                                                       settings.precision,
                                                       cutoff=settings.noise_ema_cutoff,
                                                       compile_forwards=settings.compile_all),
                            device)
        times["noise_adaptation"] += dt
        teacher = EnsembleTeacher(members[k], settings.ensemble, "eval")
        noise_teacher = EnsembleTeacher(adapted, settings.ensemble, settings.noise_teacher_mode)
        (pf, pn), dt = timed(lambda: (
            teacher_soft_labels(teacher, traj, settings.kd_temperature, settings.label_chunk,
                                settings.precision, compile_forwards=settings.compile_all),
            teacher_soft_labels(noise_teacher, traj, settings.kd_temperature, settings.label_chunk,
                                settings.precision, compile_forwards=settings.compile_all)),
            device)
        times["soft_labels"] += dt
        trajectories.append(traj)
        labels.append(lab)
        teacher_probs.append(pf)
        noise_probs.append(pn)
        adapted_all.append(adapted)
    students = init_cluster_models(factory, K, cfg.seed, device)
    initial_students = [copy.deepcopy(s) for s in students]
    trainer = OnlineBilevelTrainer(students, settings, fixed_weights("bilevel", K), device)
    _, dt = timed(lambda: trainer.run_epoch(trajectories, teacher_probs, noise_probs,
                                            progress=False), device)
    times["bilevel"] = dt
    real_ms = {name: 1e3 * value / T for name, value in times.items()}
    real_ms["total"] = sum(real_ms.values())
    report["real_ms"] = real_ms
    peak, what = peak_memory_mib(device)
    traj_mib = sum(t.numel() * t.element_size() for t in trajectories) / 2**20
    report["memory"] = {"peak_mib": peak, "measures": what, "trajectories_mib": traj_mib}
    report["images_per_s"] = K * cfg.batch / (real_ms["total"] / 1e3)
    report["synthesis_images_per_s"] = K * cfg.batch / (real_ms["synthesis"] / 1e3)
    if cfg.count:  # useful FLOPs of one real step (counted, not timed)
        report["flops"] = _count_real_flops(cfg, settings, members, trajectories, labels,
                                            adapted_all, initial_students, teacher_probs,
                                            noise_probs, device)
        _add_rates(cfg, report, device)
    if cfg.check:
        _reference_and_checks(cfg, report, members, trajectories, labels, adapted_all,
                              initial_students, teacher_probs, noise_probs, device)
    return report


def _add_rates(cfg: BenchConfig, report: dict[str, Any], device: torch.device) -> None:
    """The peak (given or estimated) and the achieved FLOP/s of the counted step."""
    peak_flops = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
    how = "given" if peak_flops else ""
    if peak_flops is None:
        peak_flops, how = estimate_peak_flops(device, cfg.dtype == "bf16")
    report["peak"] = {"flops_per_s": peak_flops, "how": how}
    report["achieved_flops_per_s"] = report["flops"]["total"] / (report["real_ms"]["total"] / 1e3)


def _count_real_flops(cfg, settings, members, trajectories, labels, adapted_all,
                      initial_students, teacher_probs, noise_probs, device) -> dict[str, float]:
    """FLOPs of one trajectory step of the real path (synthesis, adaptation, labels, bi-level).

    Counted on the eager path (the counter sees torch's operators, not compiled kernels).
    """
    K, T = cfg.num_clusters, cfg.steps
    settings = replace(settings, compile=False)
    offsets = synthesis_start(cfg.num_classes, cfg.in_channels, settings, cfg.seed,
                            cfg.image_size)[2]
    flops = {"synthesis": 0.0, "noise_adaptation": 0.0, "soft_labels": 0.0, "bilevel": 0.0}
    for k in range(K):
        x = trajectories[k][-1]
        _, f = count_flops(lambda: _real_synthesis_grad(members[k], x, labels[k], offsets[0],
                                                        settings))
        flops["synthesis"] += f
        _, f = count_flops(lambda: noise_adapted_copy(members[k], trajectories[k][-1:],
                                                      settings.noise_momentum))
        # One forward per member for the first L of the T steps (Eq. 3 cutoff).
        flops["noise_adaptation"] += f * effective_steps(
            T, settings.noise_momentum, settings.noise_ema_cutoff) / T
        teacher = EnsembleTeacher(members[k], settings.ensemble, "eval")
        noise_teacher = EnsembleTeacher(adapted_all[k], settings.ensemble, "eval")
        _, f = count_flops(lambda: (teacher_soft_labels(teacher, trajectories[k][-1:], 1.0),
                                    teacher_soft_labels(noise_teacher, trajectories[k][-1:], 1.0)))
        flops["soft_labels"] += f
    trainer = OnlineBilevelTrainer([copy.deepcopy(s) for s in initial_students], settings,
                                   fixed_weights("bilevel", K), device)
    train_idx, val_idx = (i.to(device) for i in trainer.split(cfg.batch))
    _, f = count_flops(lambda: trainer.step(1, T, [t[0] for t in trajectories],
                                            [p[0] for p in teacher_probs],
                                            [p[0] for p in noise_probs], train_idx, val_idx))
    flops["bilevel"] = f
    flops["total"] = sum(flops.values())
    return flops


def _variants(cfg: BenchConfig, settings: FedBiCrossSettings, fp32: FedBiCrossSettings
              ) -> list[tuple[str, FedBiCrossSettings]]:
    """The real path in the benchmarked dtype, plus float32 when that is bf16."""
    if cfg.dtype == "fp32":
        return [("real-fp32", fp32)]
    return [(f"real-{cfg.dtype}", settings), ("real-fp32", fp32)]


def _bn_statistics(model: nn.Module) -> Tensor:
    """All BN running means and variances of a model, concatenated (float64)."""
    return torch.cat([b.detach().double().flatten() for n, b in model.named_buffers()
                      if n.endswith(("running_mean", "running_var"))])


def _reference_and_checks(cfg, report, members, trajectories, labels, adapted_all,
                          initial_students, teacher_probs, noise_probs, device) -> None:
    """Time the reference-style path and compare it with the real path on the same inputs."""
    settings = _settings(cfg)
    fp32 = _settings(cfg, "fp32")
    gen = torch.Generator().manual_seed(cfg.seed + 7)

    def perturbed(x: Tensor) -> Tensor:
        if not cfg.perturb:
            return x
        noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        return x + cfg.perturb * noise

    ref_members = [_fp32_copies(m, grad=True) for m in members]
    ref_adapted = [_fp32_copies(a, grad=False) for a in adapted_all]
    checks: list[Check] = []

    # the three parts in this order: ``perturbed`` draws from one generator
    common = (cfg, settings, fp32, members, trajectories, perturbed, device, checks)
    synth_ms = _synthesis_checks(*common, ref_members, labels)
    bilevel_ms = _bilevel_checks(*common, ref_members, ref_adapted, adapted_all,
                                 initial_students, teacher_probs, noise_probs)
    noise_ms = _noise_adaptation_checks(*common, ref_members, adapted_all)
    ref_ms = {"synthesis": synth_ms, "noise_adaptation": noise_ms,
              "soft_labels": 0.0,  # recomputed inside every reference KD step instead
              "bilevel": bilevel_ms}
    ref_ms["total"] = sum(ref_ms.values())
    report["reference_ms"] = ref_ms
    real_ms = report["real_ms"]
    report["speedup"] = {name: (ref_ms[name] / real_ms[name] if real_ms[name] > 0 else None)
                         for name in ("synthesis", "bilevel", "total")}
    report["checks"] = [{"name": c.name, "errors": c.errors, "rtol": c.rtol,
                         "max_error": c.max_error, "passed": c.passed} for c in checks]
    report["checks_passed"] = all(c.passed for c in checks)


def _synthesis_checks(cfg: BenchConfig, settings: FedBiCrossSettings, fp32: FedBiCrossSettings,
                      members: list[list[nn.Module]], trajectories: list[Tensor],
                      perturbed: Callable[[Tensor], Tensor], device: torch.device,
                      checks: list[Check], ref_members: list[list[nn.Module]],
                      labels: list[Tensor]) -> float:
    """Median ms of a reference synthesis step; checks at x^(T) of each cluster."""
    K, T = cfg.num_clusters, cfg.steps
    # --- synthesis: timing of reference steps, then equality at x^(T) --------------------------
    synth_ms = 0.0
    for k in range(K):
        lab, x0, offsets = synthesis_start(cfg.num_classes, cfg.in_channels, settings,
                                         derive_seed(cfg.seed, 3, 0, k), cfg.image_size)
        x = x0.to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=settings.synth_lr)
        lab = lab.to(device)
        step_times = []
        for t in range(cfg.ref_steps):
            _, dt = timed(lambda: reference_synthesis_step(ref_members[k], x, lab,
                                                           offsets[t % T], settings, opt), device)
            step_times.append(dt)
        synth_ms += 1e3 * statistics.median(step_times)
        # Equality at x^(T) of the real run (a realistic image), first jitter offset.
        xt, yk = trajectories[k][-1].float(), labels[k]
        ref_terms, ref_grad = _ref_synthesis_grad(ref_members[k], perturbed(xt), yk, offsets[0],
                                                  fp32)
        for name, s in _variants(cfg, settings, fp32):
            terms, grad = _real_synthesis_grad(members[k], xt, yk, offsets[0], s)
            rtol = TIGHT_RTOL if s.precision == "fp32" else LOOSE_RTOL
            checks.append(Check(f"synthesis cluster {k}: {name} vs reference-fp32", {
                "CE": rel_err(terms[0], ref_terms[0], 1.0), "R_BN": rel_err(terms[1], ref_terms[1], 1.0),
                "R_TV": rel_err(terms[2], ref_terms[2], 1.0), "grad_x": rel_err(grad, ref_grad)}, rtol))

    return synth_ms


def _bilevel_checks(cfg: BenchConfig, settings: FedBiCrossSettings, fp32: FedBiCrossSettings,
                    members: list[list[nn.Module]], trajectories: list[Tensor],
                    perturbed: Callable[[Tensor], Tensor], device: torch.device,
                    checks: list[Check], ref_members: list[list[nn.Module]],
                    ref_adapted: list[list[nn.Module]], adapted_all: list[list[nn.Module]],
                    initial_students: list[nn.Module], teacher_probs: list[Tensor],
                    noise_probs: list[Tensor]) -> float:
    """Median ms of a reference bi-level step; checks of one step t = ceil(T/2)."""
    K, T = cfg.num_clusters, cfg.steps
    # --- bi-level: same students, step t = ceil(T/2) ---------------------------------------------
    t = (T + 1) // 2
    images = [traj[t - 1].float() for traj in trajectories]
    ref_images = [perturbed(x) for x in images]
    w0 = torch.as_tensor(fixed_weights("bilevel", K), dtype=torch.float64)

    ref_students = _fp32_copies(initial_students, grad=True)
    ref = ReferenceBilevel(ref_students, ref_members, ref_adapted, w0.to(device), fp32)
    split = OnlineBilevelTrainer(initial_students, fp32, w0.numpy(), device).split(cfg.batch)
    train_idx, val_idx = (i.to(device) for i in split)
    (ref_val, _), dt = timed(lambda: ref.step(t, T, ref_images, train_idx, val_idx), device)
    step_times = [dt]
    for extra in range(1, cfg.ref_steps):  # further timed steps, not compared
        timing_ref = ReferenceBilevel(_fp32_copies(initial_students, grad=True), ref_members,
                                      ref_adapted, w0.to(device), fp32)
        _, dt = timed(lambda: timing_ref.step(t, T, ref_images, train_idx, val_idx), device)
        step_times.append(dt)
    bilevel_ms = 1e3 * statistics.median(step_times)

    for name, s in _variants(cfg, settings, fp32):
        students = [copy.deepcopy(m) for m in initial_students]
        to_channels_last(students)
        trainer = OnlineBilevelTrainer(students, s, w0.numpy(), device)
        if s.precision == "fp32":  # float32 soft labels of the stored teachers, step t
            pf, pn = [], []
            for k in range(K):
                teacher = EnsembleTeacher(members[k], s.ensemble, "eval")
                noise_teacher = EnsembleTeacher(adapted_all[k], s.ensemble, s.noise_teacher_mode)
                pf.append(teacher_soft_labels(teacher, trajectories[k][t - 1:t], s.kd_temperature)[0])
                pn.append(teacher_soft_labels(noise_teacher, trajectories[k][t - 1:t], s.kd_temperature)[0])
        else:
            pf = [p[t - 1] for p in teacher_probs]
            pn = [p[t - 1] for p in noise_probs]
        val, _ = trainer.step(t, T, images, pf, pn, train_idx, val_idx)
        real_delta = torch.cat([(a.detach() - b.detach()).flatten() for st, st0 in
                                zip(students, initial_students)
                                for a, b in zip(st.parameters(), st0.parameters())])
        ref_delta = torch.cat([(a.detach() - b.detach()).flatten() for st, st0 in
                               zip(ref_students, initial_students)
                               for a, b in zip(st.parameters(), st0.parameters())])
        tight = s.precision == "fp32"
        checks.append(Check(f"bi-level step {t}/{T}: {name} vs reference-fp32", {
            "student_update": rel_err(real_delta, ref_delta), "val_loss": rel_err(val, ref_val, 1.0),
            "weights": rel_err(trainer.weights, ref.weights)},
            TIGHT_RTOL if tight else LOOSE_RTOL,
            # With unit normalisation a bf16 rounding can flip a near-tie hypergradient
            # direction: the weights are gated in float32 only.
            gating={"weights": tight}))

    return bilevel_ms


def _noise_adaptation_checks(cfg: BenchConfig, settings: FedBiCrossSettings,
                             fp32: FedBiCrossSettings, members: list[list[nn.Module]],
                             trajectories: list[Tensor], perturbed: Callable[[Tensor], Tensor],
                             device: torch.device, checks: list[Check],
                             ref_members: list[list[nn.Module]],
                             adapted_all: list[list[nn.Module]]) -> float:
    """Ms per step of the reference noise adaptation; checks of Eq. 3."""
    K, T = cfg.num_clusters, cfg.steps
    # Noise adaptation the reference way: the same forwards in float32, NCHW.
    steps = min(cfg.ref_steps, T)
    _, dt = timed(lambda: [noise_adapted_copy(ref_members[k], trajectories[k][:steps].float(),
                                              settings.noise_momentum) for k in range(K)], device)
    noise_ms = 1e3 * dt / steps
    # Equality: Eq. 3 over EVERY step in float32 (reference codes have no cutoff) against the
    # real copy (bf16 and float32, with the noise-ema-cutoff), BN statistics of cluster 0's
    # first member: this is what checks the cutoff.
    (ref_copy,) = noise_adapted_copy(ref_members[0][:1], perturbed(trajectories[0].float()),
                                     settings.noise_momentum)
    used = effective_steps(T, settings.noise_momentum, settings.noise_ema_cutoff)
    for name, s in _variants(cfg, settings, fp32):
        if s.precision == settings.precision:
            real_copy = adapted_all[0][0]
        else:
            (real_copy,) = noise_adapted_copy(members[0][:1], trajectories[0], s.noise_momentum,
                                              cutoff=s.noise_ema_cutoff)
        checks.append(Check(f"noise adaptation ({used} of {T} steps): {name} vs reference-fp32", {
            "bn_statistics": rel_err(_bn_statistics(real_copy), _bn_statistics(ref_copy))},
            TIGHT_RTOL if s.precision == "fp32" else LOOSE_RTOL))
    return noise_ms


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines of a :func:`run_benchmark` report."""
    c = report["config"]
    lines = [f"FedBiCross server stage: N={c['num_clients']} K={c['num_clusters']} "
             f"B={c['batch']} T={c['steps']} model={c['model']} device={c['device']} "
             f"dtype={c['dtype']} threads={torch.get_num_threads()}"]
    real, ref = report["real_ms"], report.get("reference_ms")
    lines.append(f"{'ms per trajectory step':28s} {'real':>10s} {'reference':>10s} {'speed-up':>9s}")
    for name in ("synthesis", "noise_adaptation", "soft_labels", "bilevel", "total"):
        r = f"{ref[name]:10.1f}" if ref else f"{'-':>10s}"
        sp = report.get("speedup", {}).get(name)
        lines.append(f"{name:28s} {real[name]:10.1f} {r} {f'{sp:8.2f}x' if sp else '':>9s}")
    lines.append(f"images/s (K*B per step): {report['images_per_s']:.1f}; synthesis only: "
                 f"{report['synthesis_images_per_s']:.1f}")
    f = report["flops"]
    lines.append(f"counted FLOPs per step: {f['total'] / 1e9:.3g} GFLOP (synthesis "
                 f"{f['synthesis'] / 1e9:.3g}, bi-level {f['bilevel'] / 1e9:.3g}); achieved "
                 f"{report['achieved_flops_per_s'] / 1e9:.3g} GFLOP/s")
    peak = report["peak"]
    if peak["flops_per_s"]:
        lines.append(f"peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s ({peak['how']}): "
                     f"{100 * report['achieved_flops_per_s'] / peak['flops_per_s']:.1f}% of peak")
    m = report["memory"]
    lines.append(f"peak memory {m['peak_mib']:.0f} MiB ({m['measures']}); trajectories "
                 f"{m['trajectories_mib']:.1f} MiB")
    for check in report.get("checks", []):
        errs = ", ".join(f"{k} {v:.1e}" for k, v in check["errors"].items())
        lines.append(f"check {'PASS' if check['passed'] else 'FAIL'} {check['name']}: "
                     f"max rel err {check['max_error']:.1e} <= {check['rtol']:.0e}? ({errs})")
    if "checks_passed" in report:
        lines.append(f"all checks passed: {report['checks_passed']}")
    return "\n".join(lines)
