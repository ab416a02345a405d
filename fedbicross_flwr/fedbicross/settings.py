"""Hyper-parameters of the FedBiCross server side (paper Sec. III-A/B, Sec. IV-A).

Defaults are the paper's values where the paper gives one; the other defaults are choices
explained next to each field (the README's FedBiCross table gives each deviation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

_BN_REDUCTIONS = ("mean", "sum")
_ENSEMBLES = ("prob", "logit")
_NOISE_TEACHER_MODES = ("eval", "train")
_HYPERGRAD_NORMALISATIONS = ("unit", "none")
_WEIGHTS_MODES = ("bilevel", "intra", "uniform", "similarity")
_STUDENT_INITS = ("random", "cluster-average")
_STUDENT_BN_MODES = ("train", "keep", "eval")
_MIXED_PRECISION = ("none", "bf16")
_CLUSTER_ON = ("predictions", "parameters", "hierarchical")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(
    name: str, value: float, low: float, high: float | None = None, *, low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        upper = "inf" if high is None else str(high)
        raise ValueError(f"{name} must be a number in {left}{low}, {upper}{right}, got {value!r}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class FedBiCrossSettings:
    """All knobs of Stages 1 and 2 (clustering, synthesis, noise adaptation, bi-level KD)."""

    # --- Stage 1: clustering (Sec. III-A-1) -------------------------------------------------
    # K, number of client clusters; K=1 is the "w/o Clus" ablation (one ensemble, w = [1]).
    num_clusters: int = 2
    # M, number of N(0, 1) noise images whose softmax outputs form the M x C prediction matrix.
    noise_samples: int = 256
    # K-means restarts (scikit-learn ``n_init``); the best inertia is kept.
    kmeans_n_init: int = 10
    # What the clients are clustered on (see clustering_alternatives.py): 'predictions' (paper,
    # K-means on the noise prediction matrices), 'parameters' (ablation: K-means on the
    # flattened model parameters) or 'hierarchical' (ablation, CFL-style: complete-linkage
    # clustering of the cosine similarity of the updates w_i - w^(0)).
    cluster_on: str = "predictions"

    # --- Stage 1: trajectory synthesis, DeepInversion (Eq. 1-2) --------------------------------
    # T, synthesis iterations = length of the stored trajectory x^(1..T).
    synth_steps: int = 500
    # B, synthetic images per cluster and per step.
    synth_batch: int = 256
    # eta_s, Adam learning rate on the input images.
    synth_lr: float = 0.05
    # alpha_TV, weight of the total-variation prior R_TV (DeepInversion's L2 form, see losses.tv_loss).
    tv_weight: float = 2.5e-5
    # alpha_BN, weight of the BatchNorm feature-statistics prior R_BN.
    bn_weight: float = 10.0
    # How R_BN combines ensemble members (each member: sum over its BN layers).
    # 'mean' (default): average over members, so the CE/BN balance does not depend on the
    # cluster size (clusters of 1 and of 8 clients get the same effective alpha_BN).
    # 'sum': FedISCA's code, which makes the BN term grow linearly with the cluster size.
    bn_reduction: str = "mean"
    # Ensemble teacher F_k. 'prob' (default): F_k(x) = mean_i softmax(f_i(x)), the paper's
    # formula, which averages the client outputs as probabilities like the clustering step
    # does. 'logit': softmax(mean_i f_i(x)) as in FedISCA's code; a prototype found it
    # over-confident (one member dominates) and it collapsed to one class on RetinaMNIST.
    ensemble: str = "prob"
    # Random roll jitter (pixels, both axes, uniform in [-jitter, jitter]) applied to the images
    # before each synthesis forward pass (DeepInversion/FedISCA use 2 for 28x28 / 32x32).
    jitter: int = 2

    # --- Stage 1: noise-adapted teacher (Eq. 3) ------------------------------------------------
    # Torch BN momentum used when forwarding the reversed trajectory. The paper's beta=0.9 weighs
    # the OLD value (mu <- beta*mu + (1-beta)*mu_batch), i.e. torch ``momentum = 1 - beta = 0.1``.
    noise_momentum: float = 0.1
    # Eq. 3 skips the trajectory steps whose total EMA weight is below this (the late steps,
    # weighted beta^(t-1)): every adapted statistic moves by at most cutoff x its spread.
    # 1e-7 is below float32 rounding of the EMA (L = 153 of T = 500 at beta = 0.9); 0 = all T.
    noise_cutoff: float = 1e-7
    # 'eval' (paper): the adapted copy is used with its adapted running statistics.
    # 'train' (FedISCA code): the copy stays in train mode, so it uses per-batch statistics.
    noise_teacher_mode: str = "eval"

    # --- Stage 2: bi-level cross-cluster KD (Eq. 4-8) -----------------------------------------
    # Fraction of each synthetic batch used as the validation split I^val (fixed index split).
    val_fraction: float = 0.2
    # tau, KD temperature of Eq. 5 (losses are scaled by tau^2).
    tau: float = 20.0
    # eta_G, SGD learning rate of the cluster models G_k (Eq. 7). The paper does not give it;
    # 0.01 is the usual KD student rate (DENSE); FedISCA's 1e-3 is meant for 100 x 500 steps,
    # while FedBiCross by default makes only T=500 steps.
    student_lr: float = 0.01
    # Heavy-ball momentum of the inner SGD step. The hypergradient stays exact with momentum,
    # since the old momentum buffer does not depend on the current w.
    student_momentum: float = 0.9
    # L2 weight decay of the inner SGD step (FedISCA/DENSE: 5e-4); it does not depend on w either.
    student_weight_decay: float = 5e-4
    # eta_w, learning rate of the cross-cluster weights (Eq. 8). With 'unit' normalisation it is
    # the L2 length of one outer step before the simplex projection: 0.01 x T=500 steps lets a
    # weight travel the whole simplex a few times, but not in a handful of steps.
    weight_lr: float = 0.01
    # 'unit' (default): the hypergradient is centred (its component along (1,...,1) does not
    # change the simplex projection) and scaled to unit L2 norm each step. The raw one-step
    # hypergradient is -eta_G * <g_val, g_j> and spans orders of magnitude over a run (about
    # 660 at the first step, 0.004 later in a prototype): a fixed eta_w either saturates at once
    # or never moves. 'none': the raw hypergradient (the paper's literal Eq. 8).
    hypergrad_normalisation: str = "unit"
    # How the cross-cluster weights w_k are obtained: 'bilevel' (paper, Eq. 8, start at 1/K),
    # or fixed ablations: 'intra' (one-hot own cluster), 'uniform' (1/K), 'similarity'
    # (row-normalised cosine similarity of the clustering centroids).
    weights_mode: str = "bilevel"
    # G_k^(0): 'random' (Algorithm 1, line 11) or 'cluster-average', the data-size weighted
    # parameter average of the cluster's members (they share the initial model w^(0), as in
    # FedAvg). A deviation for small server budgets: with a few hundred inner steps a randomly
    # initialised ResNet-18 is still far from its teachers.
    student_init: str = "random"
    # BatchNorm of G_k during server KD: 'train' normalises with the synthetic batch's
    # statistics and moves G_k's running statistics towards the synthetic images (FedISCA's
    # code; the paper is silent); 'eval' normalises with G_k's running statistics and never
    # changes them, so G_k is trained as it is evaluated on real images; 'keep' normalises
    # with batch statistics like 'train' but leaves the running statistics as they were. With
    # student_init='cluster-average' those are the members' averaged real-data statistics.
    student_bn: str = "train"
    # Server epochs: synthesis + noise adaptation + bi-level KD repeated with fresh noise;
    # cluster models, momentum buffers and weights carry over (FedISCA uses 100; paper: silent).
    server_epochs: int = 1
    # Passes of the online bi-level stage (Eq. 7-8, t = 1..T) over each server epoch's
    # trajectory and soft labels (paper: 1). Replaying the stored trajectory trains G_k longer
    # at the cost of KD steps only (no new synthesis): a deviation for small budgets.
    kd_passes: int = 1
    # Synthetic images per KD step (0 = synth_batch: the paper's one step per trajectory step).
    # A large synthesis batch B (DeepInversion: 256, many distinct images) is then cut into
    # B / kd_batch KD steps per trajectory step, so the student sees more distinct images
    # without larger KD batches. B must be a multiple of it.
    kd_batch: int = 0

    # --- Engineering ----------------------------------------------------------------------------
    # Master seed: noise images, K-means, labels, jitter, split, cluster-model initialisation.
    seed: int = 0
    # 'bf16' runs synthesis and KD forward passes under torch.autocast(bfloat16) (about 1.8x
    # faster on CPU in a prototype); 'none' keeps full precision.
    mixed_precision: str = "none"
    # Number of final synthetic images per cluster kept for a picture grid.
    num_examples: int = 16
    # Trajectory steps forwarded together when computing teacher soft labels (memory bound).
    label_chunk: int = 8
    # torch.compile (inductor) the members' forward inside synthesis (Eq. 2), where most of
    # the server time goes. Same numbers up to float rounding; costs a one-off compile.
    compile: bool = False

    def __post_init__(self) -> None:
        _check_int("num_clusters", self.num_clusters, 1)
        _check_int("noise_samples", self.noise_samples, 1)
        _check_int("kmeans_n_init", self.kmeans_n_init, 1)
        _check_choice("cluster_on", self.cluster_on, _CLUSTER_ON)
        _check_int("synth_steps", self.synth_steps, 1)
        # At least one training and one validation image per batch.
        _check_int("synth_batch", self.synth_batch, 2)
        _check_float("synth_lr", self.synth_lr, 0.0, low_open=True)
        _check_float("tv_weight", self.tv_weight, 0.0)
        _check_float("bn_weight", self.bn_weight, 0.0)
        _check_choice("bn_reduction", self.bn_reduction, _BN_REDUCTIONS)
        _check_choice("ensemble", self.ensemble, _ENSEMBLES)
        _check_int("jitter", self.jitter, 0)
        _check_float("noise_momentum", self.noise_momentum, 0.0, 1.0)
        _check_float("noise_cutoff", self.noise_cutoff, 0.0, 1.0, high_open=True)
        _check_choice("noise_teacher_mode", self.noise_teacher_mode, _NOISE_TEACHER_MODES)
        _check_float("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _check_float("tau", self.tau, 0.0, low_open=True)
        _check_float("student_lr", self.student_lr, 0.0, low_open=True)
        _check_float("student_momentum", self.student_momentum, 0.0, 1.0, high_open=True)
        _check_float("student_weight_decay", self.student_weight_decay, 0.0)
        _check_float("weight_lr", self.weight_lr, 0.0)
        _check_choice(
            "hypergrad_normalisation", self.hypergrad_normalisation, _HYPERGRAD_NORMALISATIONS
        )
        _check_choice("weights_mode", self.weights_mode, _WEIGHTS_MODES)
        _check_choice("student_init", self.student_init, _STUDENT_INITS)
        _check_choice("student_bn", self.student_bn, _STUDENT_BN_MODES)
        _check_int("server_epochs", self.server_epochs, 1)
        _check_int("kd_passes", self.kd_passes, 1)
        _check_int("kd_batch", self.kd_batch, 0)
        if self.kd_batch and (self.kd_batch < 2 or self.synth_batch % self.kd_batch):
            raise ValueError(f"kd_batch must be 0 or a divisor >= 2 of synth_batch="
                             f"{self.synth_batch}, got {self.kd_batch}")
        _check_int("seed", self.seed, 0)
        _check_choice("mixed_precision", self.mixed_precision, _MIXED_PRECISION)
        _check_int("num_examples", self.num_examples, 0)
        _check_int("label_chunk", self.label_chunk, 1)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")

    def with_overrides(self, **overrides: Any) -> FedBiCrossSettings:
        """Return a validated copy with some fields replaced (unknown names raise TypeError)."""
        return replace(self, **overrides)


def cpu_budget_settings(**overrides: Any) -> FedBiCrossSettings:
    """Settings for a 2-core CPU budget (a few minutes per server epoch for N=5 ResNet-18s).

    With the paper's alpha_BN = 10 and only 100-200 Adam steps, the BN prior dominates and the
    teachers label the final images at chance. Measured on one 2-member RetinaMNIST ensemble
    (ResNet-18s trained 3 epochs; T=100, B=32, probability ensemble, R_BN averaged over members;
    agreement of the teacher with the target labels on x^(T), chance 22%):
    paper values (alpha_BN 10, lr 0.05) 22%; alpha_BN 1, lr 0.1: 25%; alpha_BN 0.1, lr 0.1:
    47%; alpha_BN 0.1, lr 0.2: 59%; alpha_BN 0.01, lr 0.1: 81%; alpha_BN 0 (no prior): 22%
    (the images leave the BN statistics and the members collapse to one class). Logit
    averaging at alpha_BN 0.1: 41%. These values are a starting point for that budget, not the
    paper's; check ``teacher_accuracy`` in the synthesis diagnostics on new data.

    Parameters
    ----------
    **overrides
        Any field of :class:`FedBiCrossSettings`.

    Returns
    -------
    FedBiCrossSettings
    """
    base: dict[str, Any] = dict(
        noise_samples=64,
        synth_steps=200,
        synth_batch=32,
        synth_lr=0.1,
        bn_weight=0.01,
        bn_reduction="mean",
        ensemble="prob",
        mixed_precision="bf16",
    )
    base.update(overrides)
    return FedBiCrossSettings(**base)
