"""The run-config keys of the FedBiCross server stage (paper Sec. III-A/B, Sec. IV-A).

:class:`FedBiCrossConfig` holds FedBiCross's own keys (clustering, server epochs, bi-level KD);
the trajectory synthesis, noise adaptation and soft-label keys it shares with FedISCA are in
:mod:`fedbicross_flwr.distill.config`. Each default is the paper's value where the paper gives
one (``conf/paper.toml``). :class:`FedBiCrossSettings` is what the algorithm core reads: both,
the shared keys ``seed``, ``precision``, ``compile`` and ``compile-scope``, and two engineering
constants that are not run-config keys. Field names are the keys' names (``kd_temperature`` is ``kd-temperature``,
tau of Eq. 5). This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbicross_flwr.distill.config import SynthesisSettings
from fedbicross_flwr.distill.schedule import step_schedule
from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.keys.fields import Section, key

# What FedBiCross clusters the clients on (fedbicross_flwr.fedbicross.clustering_alternatives).
CLUSTER_ON = ("predictions", "parameters", "hierarchical")


@dataclass(frozen=True)
class FedBiCrossConfig(Section):
    """The keys of FedBiCross's own server stage: clustering (Stage 1a) and the bi-level
    cross-cluster KD (Stage 2). The keys it shares with the baselines (the synthesis, the
    server epochs, the student's start) are
    :class:`~fedbicross_flwr.distill.config.SynthesisConfig`.
    """

    # K, number of client clusters; K=1 is the "w/o Clus" ablation (one ensemble, w = [1]).
    num_clusters: int = key(2, "K, number of client clusters.", low=1)
    # M, number of N(0, 1) noise images whose softmax outputs form the M x C prediction matrix.
    noise_samples: int = key(256, "M, noise images for clustering.", low=1)
    # Passes of the online bi-level stage (Eq. 7-8, t = 1..T) over each server epoch's
    # trajectory and soft labels (paper: 1). Replaying the stored trajectory trains G_k longer
    # at the cost of KD steps only (no new synthesis): a deviation for small budgets.
    kd_passes: int = key(1,
                         "Passes of the online bi-level KD stage over each server epoch's "
                         "trajectory (paper: 1; more trains G_k longer without new synthesis).",
                         low=1, high=1000)
    # K-means restarts (scikit-learn ``n_init``); the best inertia is kept.
    kmeans_n_init: int = key(10, "K-means restarts.", low=1)
    # What the clients are clustered on (see clustering_alternatives.py): 'predictions' (paper,
    # K-means on the noise prediction matrices), 'parameters' (ablation: K-means on the
    # flattened model parameters) or 'hierarchical' (ablation, CFL-style: complete-linkage
    # clustering of the cosine similarity of the updates w_i - w^(0)).
    cluster_on: str = key("predictions",
                          "What clusters the clients: predictions (paper: K-means on the "
                          "softmax outputs on noise), parameters (K-means on the flattened "
                          "model parameters) or hierarchical (CFL: complete-linkage clustering "
                          "of the cosine similarity of the updates w_i - w^(0)).",
                          choices=CLUSTER_ON)
    # Fraction of each synthetic batch used as the validation split I^val (fixed index split).
    bilevel_val_fraction: float = key(0.2,
                                      "Share of each synthetic batch used as I^val (paper: 0.2).",
                                      low=0.0, low_open=True, high=0.9)
    # eta_G, SGD learning rate of the cluster models G_k (Eq. 7). The paper does not give it;
    # 0.01 is the usual KD student rate (DENSE); FedISCA's 1e-3 is meant for 100 x 500 steps,
    # while FedBiCross by default makes only T=500 steps.
    student_lr: float = key(0.01, "eta_G, SGD rate of the cluster models (Eq. 7).",
                            low=0.0, low_open=True)
    # Step decay of eta_G over the server epochs (FedISCA's code: x0.1 at 50 % and 75 % of its
    # 100 epochs). The same rule as the FedISCA baseline; a 1-epoch run never decays. The
    # hypergradient of Eq. 8 uses the rate of the step it differentiates, so it stays exact.
    student_lr_milestones: str = key("0.5,0.75",
                                     "Fractions of the server epochs at which eta_G is divided by "
                                     "10, comma-separated (FedISCA code: 0.5,0.75; empty: "
                                     "constant; a 1-epoch run never decays).")
    # Heavy-ball momentum of the inner SGD step. The hypergradient stays exact with momentum,
    # since the old momentum buffer does not depend on the current w.
    student_momentum: float = key(0.9, "Momentum of the inner SGD step.",
                                  low=0.0, high=0.999)
    # L2 weight decay of the inner SGD step (FedISCA/DENSE: 5e-4); it does not depend on w either.
    student_weight_decay: float = key(5e-4,
                                      "Weight decay of the inner SGD step.", low=0.0)
    # eta_w, learning rate of the cross-cluster weights (Eq. 8). With 'unit' normalisation it is
    # the L2 length of one outer step before the simplex projection: 0.01 x T=500 steps lets a
    # weight travel the whole simplex a few times, but not in a handful of steps.
    weight_lr: float = key(0.01, "eta_w, step of the cross-cluster weights (Eq. 8).",
                           low=0.0)
    # 'unit' (default): the hypergradient is centred (its component along (1,...,1) does not
    # change the simplex projection) and scaled to unit L2 norm each step. The raw one-step
    # hypergradient is -eta_G * <g_val, g_j> and spans orders of magnitude over a run (about
    # 660 at the first step, 0.004 later in a prototype): a fixed eta_w either saturates at once
    # or never moves. 'none': the raw hypergradient (the paper's literal Eq. 8).
    hypergrad_norm: str = key("unit",
                              "Hypergradient centred and scaled to unit norm each step (unit) "
                              "or raw (none, Eq. 8 literally).", choices=("unit", "none"))
    # The noise-adapted teacher F~_k across server epochs: False (the paper's Eq. 3 read
    # literally) adapts a fresh copy of the members each epoch; True (FedISCA's code) keeps ONE
    # adapted copy per cluster and continues its statistics from the previous epoch's. Eq. 3
    # forgets its starting point at beta^L (L forwarded steps: below 1e-7 at T >= 153, 2.7e-5 at
    # T = 100, beta = 0.9), so the two differ only at short trajectories; with
    # noise-teacher-mode='train' the adapted statistics are never read at all.
    noise_teacher_carry: bool = key(False,
                                    "Keep one noise-adapted teacher per cluster across server "
                                    "epochs, its statistics continued (true, FedISCA code) or "
                                    "adapt a fresh copy each epoch (false, Eq. 3).")
    # BatchNorm of G_k during server KD: 'train' normalises with the synthetic batch's
    # statistics and moves G_k's running statistics towards the synthetic images (FedISCA's
    # code; the paper is silent); 'eval' normalises with G_k's running statistics and never
    # changes them, so G_k is trained as it is evaluated on real images; 'keep' normalises
    # with batch statistics like 'train' but leaves the running statistics as they were. With
    # student_init='cluster-average' those are the members' averaged real-data statistics.
    student_bn: str = key("train",
                          "BatchNorm of G_k during server KD: train (batch statistics, running "
                          "statistics follow the synthetic images; FedISCA code), keep (batch "
                          "statistics, running statistics left as they were) or eval (running "
                          "statistics in the forwards, frozen); keep/eval pair with "
                          "cluster-average.",
                          choices=("train", "keep", "eval"))
    # How the cross-cluster weights w_k are obtained: 'bilevel' (paper, Eq. 8, start at 1/K),
    # or fixed ablations: 'intra' (one-hot own cluster), 'uniform' (1/K), 'similarity'
    # (row-normalised cosine similarity of the clustering centroids).
    weights_mode: str = key("bilevel",
                            "Cross-cluster weights: learnt (bilevel, paper) or fixed ablations "
                            "intra (one-hot), uniform (1/K), similarity (centroid cosine).",
                            choices=("bilevel", "intra", "uniform", "similarity"))


    def __post_init__(self) -> None:
        super().__post_init__()
        parse_milestones(self.student_lr_milestones)

def parse_milestones(text: str) -> tuple[float, ...]:
    """``"0.5,0.75"`` -> (0.5, 0.75): increasing fractions in (0, 1]; ``""`` -> ().

    Raises
    ------
    ConfigError
        Naming the key, for anything else.
    """
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
        bad = True
    else:
        bad = any(not 0.0 < v <= 1.0 for v in values) or list(values) != sorted(set(values))
    if bad:
        raise ConfigError("run-config key 'student-lr-milestones' must be increasing fractions "
                          f"in (0, 1], comma-separated (e.g. '0.5,0.75'), or empty; got {text!r}")
    return values


@dataclass(frozen=True)
class FedBiCrossSettings(FedBiCrossConfig, SynthesisSettings):
    """All knobs of Stages 1 and 2, as the algorithm core reads them: the synthesis settings
    (:class:`~fedbicross_flwr.distill.config.SynthesisSettings`) and FedBiCross's own keys.

    Built from a run config with ``FedBiCrossSettings.of(cfg)`` (overrides as keywords, e.g.
    ``num_clusters=k``), or directly with the paper's defaults; every value is checked against
    its key's range, and ``kd_batch`` against ``synth_batch``.
    """

    # An engineering constant, not a run-config key (RunConfig does not include this class).
    num_examples: int = key(16, "Final synthetic images per cluster kept for a picture grid.",
                            low=0, constant=True)

    def lr_at(self, epoch: int) -> float:
        """eta_G in the 0-based server epoch ``epoch`` (step decay at the milestones)."""
        return step_schedule(epoch, self.server_epochs, self.student_lr,
                             parse_milestones(self.student_lr_milestones))


__all__ = ["CLUSTER_ON", "FedBiCrossConfig", "FedBiCrossSettings", "parse_milestones"]
