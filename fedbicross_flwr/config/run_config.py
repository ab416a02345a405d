"""Run configuration: every tunable is a kebab-case key, parsed and validated once.

The keys live in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (Flower only accepts overrides
of keys that exist there) and in the presets under ``conf/``. :class:`RunConfig` is the single
typed view of them; each field's metadata holds its key, its allowed range and a one-line doc,
so docs/CONFIG.md's table and the pyproject defaults are checked against this file by the tests.

An invalid value fails here, before any data is read or any model is trained, with a
:class:`ConfigError` that names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedbicross_flwr.config.errors import ConfigError
from fedbicross_flwr.methods.catalog import method_names


def _key(
    key: str,
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: tuple[str, ...] | None = None,
    setting: str | None = None,
) -> Any:
    """A dataclass field carrying its run-config key, range and doc.

    ``setting`` names the field of :class:`~fedbicross_flwr.config.settings.
    FedBiCrossSettings` that the key sets: the settings dataclass is built from the tagged
    fields (same default, same range and choices), so a FedBiCross key is declared only here.
    """
    meta = {"key": key, "doc": doc, "low": low, "high": high, "low_open": low_open,
            "choices": choices, "setting": setting}
    return field(default=default, metadata=meta)


def kd_batch_problem(kd_batch: int, synth_batch: int) -> str | None:
    """Why ``kd_batch`` cannot cut batches of ``synth_batch`` images, or None."""
    if kd_batch and (kd_batch < 2 or synth_batch % kd_batch):
        return f"must be 0 or a divisor >= 2 of synth-batch={synth_batch}, got {kd_batch}"
    return None


# What FedBiCross clusters the clients on (fedbicross_flwr.fedbicross.clustering_alternatives).
CLUSTER_ON = ("predictions", "parameters", "hierarchical")




@dataclass(frozen=True)
class RunConfig:
    """Typed, validated run configuration (one field per run-config key)."""

    # --- what to run ---------------------------------------------------------------------
    method: str = _key("method", "fedavg1", "Server method (registry name).",
                       choices=method_names())
    methods: str = _key("methods", "",
                        "Comma-separated server methods run in ONE run on the same client "
                        "uploads (phase 1 once; then per method: server method and "
                        "personalization), one run folder each plus, for 2+ methods, "
                        "<run-name>-comparison (table and summary picture). Empty: only `method`. A multi-round "
                        "method (fedavg-r, fedadam-r, ...) retrains the clients: at most one, "
                        "last.")
    dataset: str = _key("dataset", "retinamnist",
                        "MedMNIST 2D flag (e.g. bloodmnist), `digits` (scikit-learn, built on "
                        "the fly) or `custom` (an npz archive at data-path).")
    data_dir: str = _key("data-dir", "",
                         "Folder with official MedMNIST archives (<flag>.npz). Empty: "
                         "$FEDBICROSS_DATA_DIR, else the archive embedded in the package.")
    data_path: str = _key("data-path", "",
                          "An npz archive in MedMNIST format (dataset=custom). In deployment "
                          "each site sets it in its node config instead.")
    allow_download: bool = _key("allow-download", False,
                                "Let the medmnist package download a missing official archive.")
    in_channels: int = _key("in-channels", 0,
                            "Image channels; 0 = from the dataset's metadata (needed for "
                            "custom).", low=0, high=3)
    num_classes: int = _key("num-classes", 0,
                            "Number of classes; 0 = from the dataset's metadata (needed for "
                            "custom).", low=0, high=1000)
    # Base channel count w of the CIFAR-style ResNet-18 every client and server model uses:
    # stages of w, 2w, 4w, 8w channels (paper: 64). Forward FLOPs grow about with w^2.
    model_width: int = _key("model-width", 64,
                            "Base channel count w of ResNet-18 (stages w, 2w, 4w, 8w; paper: "
                            "64). Forward FLOPs grow about with w^2: 16 costs about 1/16 of 64.",
                            low=4, high=128)
    # In FedBiCross: the master seed of the noise images, K-means, labels, jitter, the I^val
    # split and the cluster-model initialisation.
    seed: int = _key("seed", 0, "Seed of the partition, the models and every sampler.", low=0,
                     setting="seed")

    # --- federation ----------------------------------------------------------------------
    num_clients: int = _key("num-clients", 5,
                            "Nodes the server waits for before phase 1.", low=1, high=10000)
    min_clients: int = _key("min-clients", 0,
                            "Fewest answering clients to go on with (0 = all of num-clients).",
                            low=0, high=10000)
    node_wait_timeout: float = _key("node-wait-timeout", 120.0,
                                    "Seconds to wait for num-clients nodes to connect.", low=0.0)
    round_timeout: float = _key("round-timeout", 0.0,
                                "Seconds to wait for the replies of one phase (0 = no limit).",
                                low=0.0)
    site_nodes: str = _key("site-nodes", "",
                           "Deployment: the node id of each site, as `partition-id=node-id` "
                           "pairs separated by commas (node ids from `flwr supernode "
                           "register`). Only that node is sent the site's instructions and "
                           "only its replies count for the partition. Empty: in simulation the "
                           "server assigns the partitions to the connected nodes; in deployment "
                           "the sites' own partition-ids are trusted and a partition claimed "
                           "twice is refused.")
    max_num_examples: int = _key("max-num-examples", 0,
                                 "Largest num-examples (FedAvg weight) a client may report. 0: "
                                 "in simulation the size of the partition the server assigned; "
                                 "in deployment no bound.", low=0)
    alpha: float = _key("alpha", 0.1, "Dirichlet concentration of the label skew (lower = more "
                        "non-IID).", low=0.0, low_open=True, high=1e6)
    min_partition_size: int = _key("min-partition-size", 10,
                                   "Smallest training partition the Dirichlet sampler accepts.",
                                   low=1)
    val_fraction: float = _key("val-fraction", 0.1,
                               "Share of each client's partition held out as local validation.",
                               low=0.0, high=0.5)

    # --- client local training (paper Sec. IV-A) -------------------------------------------
    local_epochs: int = _key("local-epochs", 100, "Local training epochs (paper: 100).", low=1)
    local_lr: float = _key("local-lr", 1e-3, "Local SGD learning rate (paper: 1e-3).",
                           low=0.0, low_open=True, high=10.0)
    local_momentum: float = _key("local-momentum", 0.9, "Local SGD momentum.", low=0.0, high=0.999)
    local_weight_decay: float = _key("local-weight-decay", 5e-4, "Local SGD weight decay.",
                                     low=0.0, high=1.0)
    batch_size: int = _key("batch-size", 128, "Client batch size (paper: 128).", low=1)

    # --- personalization (Stage 3, Eq. 9) ---------------------------------------------------
    pers_epochs: int = _key("pers-epochs", 10,
                            "Personalized distillation epochs (paper: 10; 0 = none, w/o PKD).",
                            low=0)
    pers_lr: float = _key("pers-lr", 1e-3, "Personalization SGD learning rate.",
                          low=0.0, low_open=True, high=10.0)
    pers_gamma: float = _key("pers-gamma", 0.5, "Eq. 9 weight of KL to the received model.",
                             low=0.0, high=100.0)
    pers_delta: float = _key("pers-delta", 0.3, "Eq. 9 weight of KL to the client's own model.",
                             low=0.0, high=100.0)

    # --- execution -------------------------------------------------------------------------
    device: str = _key("device", "auto", "auto (CUDA when present), cpu or cuda.",
                       choices=("auto", "cpu", "cuda"))
    # In FedBiCross: 'bf16' runs synthesis and KD forward passes under
    # torch.autocast(bfloat16) (about 1.8x faster on CPU in a prototype); 'fp32' keeps full
    # precision.
    precision: str = _key("precision", "fp32",
                          "fp32, or bf16 autocast for training/synthesis forward passes.",
                          choices=("fp32", "bf16"), setting="mixed_precision")
    eval_precision: str = _key("eval-precision", "fp32",
                               "Precision of the accuracy forwards (evaluation only): fp32, or "
                               "bf16 autocast with channels-last (about 2x faster on CPU; 0-2 "
                               "of 540 digits test predictions change, docs/RESULTS.md).",
                               choices=("fp32", "bf16"))
    num_threads: int = _key("num-threads", 0, "torch CPU threads (0 = torch's default).", low=0)
    # FedBiCross: torch.compile (inductor) the members' forward inside synthesis (Eq. 2),
    # where most of the server time goes. Same numbers up to float rounding; costs a one-off
    # compile.
    compile: bool = _key("compile", False,
                         "torch.compile the client models' forward inside FedBiCross synthesis "
                         "(inductor; a one-off compile of about a minute on CPU, seconds from "
                         "its disk cache, one graph per architecture; then about 13% less "
                         "time per synthesis step on CPU at N=5, B=64; docs/BENCHMARKS.md).",
                         setting="compile")
    output_dir: str = _key("output-dir", "",
                           "Absolute folder for run folders. Empty: $FEDBICROSS_OUTPUT_DIR, "
                           "else <project>/outputs.")
    run_name: str = _key("run-name", "",
                         "Name of the run folder (empty: <time>-<dataset>-<method>).")
    progress: bool = _key("progress", True, "Show progress bars / periodic log lines.")
    resume: bool = _key("resume", False,
                        "Continue the run folder named run-name from its checkpoints (finished "
                        "server stages are not redone); needs run-name.")
    keep_checkpoints: bool = _key("keep-checkpoints", False,
                                  "Keep the run folder's checkpoints/ (uploads, server stages) "
                                  "after a successful run (default: deleted to save disk).")

    # --- FedBiCross server stage (Stages 1-2) ---------------------------------------------
    # K, number of client clusters; K=1 is the "w/o Clus" ablation (one ensemble, w = [1]).
    num_clusters: int = _key("num-clusters", 2, "K, number of client clusters.", low=1,
                             setting="num_clusters")
    # M, number of N(0, 1) noise images whose softmax outputs form the M x C prediction matrix.
    noise_samples: int = _key("noise-samples", 256, "M, noise images for clustering.", low=1,
                              setting="noise_samples")
    # Server epochs: synthesis + noise adaptation + bi-level KD repeated with fresh noise;
    # cluster models, momentum buffers and weights carry over (FedISCA uses 100; paper: silent).
    server_epochs: int = _key("server-epochs", 1,
                              "Repeats of synthesis + bi-level with fresh noise.", low=1,
                              setting="server_epochs")
    # Passes of the online bi-level stage (Eq. 7-8, t = 1..T) over each server epoch's
    # trajectory and soft labels (paper: 1). Replaying the stored trajectory trains G_k longer
    # at the cost of KD steps only (no new synthesis): a deviation for small budgets.
    kd_passes: int = _key("kd-passes", 1,
                          "Passes of the online bi-level KD stage over each server epoch's "
                          "trajectory (paper: 1; more trains G_k longer without new synthesis).",
                          low=1, high=1000, setting="kd_passes")
    # Synthetic images per KD step (0 = synth_batch: the paper's one step per trajectory step).
    # A large synthesis batch B (DeepInversion: 256, many distinct images) is then cut into
    # B / kd_batch KD steps per trajectory step, so the student sees more distinct images
    # without larger KD batches. B must be a multiple of it.
    kd_batch: int = _key("kd-batch", 0,
                         "Synthetic images per KD step: each trajectory step's B = synth-batch "
                         "images are cut into B / kd-batch KD steps (0 = B, paper: one KD step "
                         "per trajectory step). Used by fedbicross and fedisca.", low=0,
                         setting="kd_batch")
    # T, synthesis iterations = length of the stored trajectory x^(1..T).
    synth_steps: int = _key("synth-steps", 500, "T, DeepInversion iterations.", low=1,
                            setting="synth_steps")
    # B, synthetic images per cluster and per step.
    synth_batch: int = _key("synth-batch", 256, "B, synthetic images per cluster.", low=2,
                            setting="synth_batch")
    # eta_s, Adam learning rate on the input images.
    synth_lr: float = _key("synth-lr", 0.05, "Adam learning rate on the images (eta_s).",
                           low=0.0, low_open=True, setting="synth_lr")
    # alpha_TV, weight of the total-variation prior R_TV (DeepInversion's L2 form, see
    # losses.tv_loss).
    tv_weight: float = _key("tv-weight", 2.5e-5, "alpha_TV of Eq. 2.", low=0.0, setting="tv_weight")
    # alpha_BN, weight of the BatchNorm feature-statistics prior R_BN.
    bn_weight: float = _key("bn-weight", 10.0, "alpha_BN of Eq. 2.", low=0.0, setting="bn_weight")
    # tau, KD temperature of Eq. 5 (losses are scaled by tau^2).
    kd_temperature: float = _key("kd-temperature", 20.0, "tau of Eq. 5.",
                                 low=0.0, low_open=True, setting="tau")
    # beta, "the momentum" of Eq. 3: mu~ <- beta * mu~ + (1 - beta) * mu(x), so beta weighs the
    # OLD value. The BN layers forwarding the reversed trajectory get PyTorch's
    # ``momentum = 1 - beta`` (PyTorch weighs the new batch), computed in noise_adapt only.
    noise_momentum: float = _key("noise-momentum", 0.9,
                                 "beta of Eq. 3, the momentum of the noise adaptation: the "
                                 "weight of the old statistic (paper: 0.9).",
                                 low=0.0, high=1.0, setting="noise_momentum")
    # Eq. 3 skips the trajectory steps whose total EMA weight is below this (the late steps,
    # weighted beta^(t-1)): every adapted statistic moves by at most cutoff x its spread.
    # 1e-7 is below float32 rounding of the EMA (L = 153 of T = 500 at beta = 0.9); 0 = all T.
    noise_ema_cutoff: float = _key("noise-ema-cutoff", 1e-7,
                                   "Eq. 3: skip the late trajectory steps whose total EMA weight "
                                   "is below this (each adapted statistic moves by at most cutoff "
                                   "x its spread; 1e-7 is below float32 rounding; 0 = all T).",
                                   low=0.0, high=0.5, setting="noise_cutoff")
    # 'eval' (paper): the adapted copy is used with its adapted running statistics.
    # 'train' (FedISCA code): the copy stays in train mode, so it uses per-batch statistics.
    noise_teacher_mode: str = _key("noise-teacher-mode", "eval",
                                   "Noise-adapted teacher used with its adapted statistics "
                                   "(eval, paper) or per-batch statistics (train, FedISCA code).",
                                   choices=("eval", "train"), setting="noise_teacher_mode")
    # Ensemble teacher F_k. 'prob' (default): F_k(x) = mean_i softmax(f_i(x)), the paper's
    # formula, which averages the client outputs as probabilities like the clustering step
    # does. 'logit': softmax(mean_i f_i(x)) as in FedISCA's code; a prototype found it
    # over-confident (one member dominates) and it collapsed to one class on RetinaMNIST.
    ensemble: str = _key("ensemble", "prob", "Ensemble teacher: mean of member probabilities "
                         "(prob, paper's F_k) or of logits (logit, FedISCA code).",
                         choices=("prob", "logit"), setting="ensemble")
    # How R_BN combines ensemble members (each member: sum over its BN layers).
    # 'mean' (default): average over members, so the CE/BN balance does not depend on the
    # cluster size (clusters of 1 and of 8 clients get the same effective alpha_BN).
    # 'sum': FedISCA's code, which makes the BN term grow linearly with the cluster size.
    bn_reduction: str = _key("bn-reduction", "mean", "R_BN over cluster members: mean (does not "
                             "grow with cluster size) or sum (FedISCA code).",
                             choices=("mean", "sum"), setting="bn_reduction")
    # Random roll jitter (pixels, both axes, uniform in [-jitter, jitter]) applied to the images
    # before each synthesis forward pass (DeepInversion/FedISCA use 2 for 28x28 / 32x32).
    jitter: int = _key("jitter", 2, "Random roll of synthetic images, pixels.", low=0, high=8,
                       setting="jitter")
    # K-means restarts (scikit-learn ``n_init``); the best inertia is kept.
    kmeans_n_init: int = _key("kmeans-n-init", 10, "K-means restarts.", low=1,
                              setting="kmeans_n_init")
    # What the clients are clustered on (see clustering_alternatives.py): 'predictions' (paper,
    # K-means on the noise prediction matrices), 'parameters' (ablation: K-means on the
    # flattened model parameters) or 'hierarchical' (ablation, CFL-style: complete-linkage
    # clustering of the cosine similarity of the updates w_i - w^(0)).
    cluster_on: str = _key("cluster-on", "predictions",
                           "What clusters the clients: predictions (paper: K-means on the "
                           "softmax outputs on noise), parameters (K-means on the flattened "
                           "model parameters) or hierarchical (CFL: complete-linkage clustering "
                           "of the cosine similarity of the updates w_i - w^(0)).",
                           choices=CLUSTER_ON, setting="cluster_on")
    # Fraction of each synthetic batch used as the validation split I^val (fixed index split).
    bilevel_val_fraction: float = _key("bilevel-val-fraction", 0.2,
                                       "Share of each synthetic batch used as I^val (paper: 0.2).",
                                       low=0.0, low_open=True, high=0.9, setting="val_fraction")
    # eta_G, SGD learning rate of the cluster models G_k (Eq. 7). The paper does not give it;
    # 0.01 is the usual KD student rate (DENSE); FedISCA's 1e-3 is meant for 100 x 500 steps,
    # while FedBiCross by default makes only T=500 steps.
    student_lr: float = _key("student-lr", 0.01, "eta_G, SGD rate of the cluster models (Eq. 7).",
                             low=0.0, low_open=True, setting="student_lr")
    # Heavy-ball momentum of the inner SGD step. The hypergradient stays exact with momentum,
    # since the old momentum buffer does not depend on the current w.
    student_momentum: float = _key("student-momentum", 0.9, "Momentum of the inner SGD step.",
                                   low=0.0, high=0.999, setting="student_momentum")
    # L2 weight decay of the inner SGD step (FedISCA/DENSE: 5e-4); it does not depend on w either.
    student_weight_decay: float = _key("student-weight-decay", 5e-4,
                                       "Weight decay of the inner SGD step.", low=0.0,
                                       setting="student_weight_decay")
    # eta_w, learning rate of the cross-cluster weights (Eq. 8). With 'unit' normalisation it is
    # the L2 length of one outer step before the simplex projection: 0.01 x T=500 steps lets a
    # weight travel the whole simplex a few times, but not in a handful of steps.
    weight_lr: float = _key("weight-lr", 0.01, "eta_w, step of the cross-cluster weights (Eq. 8).",
                            low=0.0, setting="weight_lr")
    # 'unit' (default): the hypergradient is centred (its component along (1,...,1) does not
    # change the simplex projection) and scaled to unit L2 norm each step. The raw one-step
    # hypergradient is -eta_G * <g_val, g_j> and spans orders of magnitude over a run (about
    # 660 at the first step, 0.004 later in a prototype): a fixed eta_w either saturates at once
    # or never moves. 'none': the raw hypergradient (the paper's literal Eq. 8).
    hypergrad_norm: str = _key("hypergrad-norm", "unit",
                               "Hypergradient centred and scaled to unit norm each step (unit) "
                               "or raw (none, Eq. 8 literally).", choices=("unit", "none"),
                               setting="hypergrad_normalisation")
    # G_k^(0): 'random' (Algorithm 1, line 11) or 'cluster-average', the data-size weighted
    # parameter average of the cluster's members (they share the initial model w^(0), as in
    # FedAvg). A deviation for small server budgets: with a few hundred inner steps a randomly
    # initialised ResNet-18 is still far from its teachers.
    student_init: str = _key("student-init", "random",
                             "G_k^(0): random (Algorithm 1) or cluster-average (data-size "
                             "weighted average of the cluster's client models).",
                             choices=("random", "cluster-average"), setting="student_init")
    # BatchNorm of G_k during server KD: 'train' normalises with the synthetic batch's
    # statistics and moves G_k's running statistics towards the synthetic images (FedISCA's
    # code; the paper is silent); 'eval' normalises with G_k's running statistics and never
    # changes them, so G_k is trained as it is evaluated on real images; 'keep' normalises
    # with batch statistics like 'train' but leaves the running statistics as they were. With
    # student_init='cluster-average' those are the members' averaged real-data statistics.
    student_bn: str = _key("student-bn", "train",
                           "BatchNorm of G_k during server KD: train (batch statistics, running "
                           "statistics follow the synthetic images; FedISCA code), keep (batch "
                           "statistics, running statistics left as they were) or eval (running "
                           "statistics in the forwards, frozen); keep/eval pair with "
                           "cluster-average.",
                           choices=("train", "keep", "eval"), setting="student_bn")
    # How the cross-cluster weights w_k are obtained: 'bilevel' (paper, Eq. 8, start at 1/K),
    # or fixed ablations: 'intra' (one-hot own cluster), 'uniform' (1/K), 'similarity'
    # (row-normalised cosine similarity of the clustering centroids).
    weights_mode: str = _key("weights-mode", "bilevel",
                             "Cross-cluster weights: learnt (bilevel, paper) or fixed ablations "
                             "intra (one-hot), uniform (1/K), similarity (centroid cosine).",
                             choices=("bilevel", "intra", "uniform", "similarity"),
                             setting="weights_mode")

    # --- multi-round references (Flower's strategies: fedavg-r, fedadam-r, krum-r, ...) -----
    rounds: int = _key("rounds", 10, "R, communication rounds of a multi-round method.",
                       low=1, high=10000)
    strategy_args: str = _key("strategy-args", "",
                              "Arguments of the multi-round method's Flower strategy, as "
                              "Flower names them, e.g. \"eta=0.01 beta_1=0.9\" for fedadam-r "
                              "or \"noise_multiplier=0.5 clipping_norm=2.0\" for a DP wrapper "
                              "(checked against the strategy's signature).")
    round_epochs: int = _key("round-epochs", 0,
                             "Local epochs per round of a multi-round method (0 = "
                             "ceil(local-epochs / rounds): the clients' total compute matches "
                             "the one-shot phase 1).", low=0)
    proximal_mu: float = _key("proximal-mu", 0.01,
                              "FedProx mu: clients add mu/2 times the squared L2 distance to the "
                              "global model to their loss "
                              "(fedprox-r; sent by the server as proximal-mu).",
                              low=0.0, high=1e4)

    # --- baselines (fedbicross_flwr/baselines): FedISCA, DENSE, Co-Boosting, DAFL ----------
    # Defaults are the reference codes' values (see each method's docstring); conf/cpu.toml
    # holds CPU-scale values. All four distil into ONE global model from a random start (or
    # from the clients' average with student-init='cluster-average').
    fedisca_epochs: int = _key("fedisca-epochs", 100,
                               "FedISCA server epochs: synthesis over ALL clients with fresh "
                               "noise, noise adaptation, one KD step per trajectory step "
                               "(reference: 100). Synthesis uses synth-*, tv-weight, bn-weight, "
                               "bn-reduction, ensemble, jitter and noise-teacher-mode.", low=1)
    fedisca_lr: float = _key("fedisca-lr", 1e-3,
                             "FedISCA student SGD rate (momentum 0.9, weight decay 5e-4, x0.1 "
                             "at 50% and 75% of the epochs; reference: 1e-3).",
                             low=0.0, low_open=True, high=10.0)
    gen_epochs: int = _key("gen-epochs", 200,
                           "DENSE / Co-Boosting epochs: one generator round adds a batch to the "
                           "synthetic pool, then one KD pass over the pool (reference: 200).",
                           low=1)
    gen_steps: int = _key("gen-steps", 30, "DENSE / Co-Boosting generator Adam steps per epoch "
                          "(reference g_steps: 30).", low=1)
    gen_batch: int = _key("gen-batch", 256, "DENSE / Co-Boosting synthetic images per "
                          "generator round, and the KD batch size (reference: 256).", low=2)
    gen_lr: float = _key("gen-lr", 1e-3, "DENSE / Co-Boosting generator (and latent) Adam rate "
                         "(reference: 1e-3, betas 0.5/0.999).", low=0.0, low_open=True, high=10.0)
    gen_latent: int = _key("gen-latent", 256, "DENSE / Co-Boosting latent size nz "
                           "(reference: 256).", low=1)
    gen_bn_weight: float = _key("gen-bn-weight", 1.0,
                                "DENSE weight of the BN-statistics loss (sum over the BN layers "
                                "of all clients; reference: 1). Co-Boosting uses none "
                                "(its reference default bn=0).", low=0.0)
    gen_ce_weight: float = _key("gen-ce-weight", 1.0, "DENSE / Co-Boosting weight of the "
                                "generator's CE (Co-Boosting: hard-sample CE) (reference: 1).",
                                low=0.0)
    gen_adv_weight: float = _key("gen-adv-weight", 1.0, "DENSE / Co-Boosting weight of the "
                                 "adversarial (negative student-ensemble KL) term (reference: 1).",
                                 low=0.0)
    gen_kd_lr: float = _key("gen-kd-lr", 0.01, "DENSE / Co-Boosting student SGD rate "
                            "(momentum 0.9; reference: 0.01).", low=0.0, low_open=True, high=10.0)
    dense_kd_temperature: float = _key("dense-kd-temperature", 20.0,
                                       "DENSE KD temperature (reference: 20).",
                                       low=0.0, low_open=True)
    coboosting_kd_temperature: float = _key("coboosting-kd-temperature", 4.0,
                                            "Co-Boosting KD temperature (reference: 4).",
                                            low=0.0, low_open=True)
    coboosting_weight_lr: float = _key("coboosting-weight-lr", 0.01,
                                       "Co-Boosting sign-gradient step mu of the per-client "
                                       "ensemble weights (reference: 0.01).", low=0.0)
    coboosting_weight_decay: float = _key("coboosting-weight-decay", 0.99,
                                          "Co-Boosting step decay: the weight step at epoch e is "
                                          "mu * decay^e (reference wdc: 0.99).",
                                          low=0.0, high=1.0)
    coboosting_ods_eta: float = _key("coboosting-ods-eta", 8 / 255,
                                     "Co-Boosting ODS perturbation size on the (normalised) KD "
                                     "inputs; 0 = no ODS (reference: 8/255).", low=0.0, high=1.0)
    coboosting_hard_power: float = _key("coboosting-hard-power", 1.0,
                                        "Co-Boosting hard-sample CE exponent: (1 - p_y)^power * "
                                        "CE (reference hs: 1).", low=0.0, high=10.0)
    dafl_epochs: int = _key("dafl-epochs", 2000, "DAFL epochs (reference, CIFAR-10 recipe for "
                            "a ResNet-18 student: 2000).", low=1)
    dafl_iterations: int = _key("dafl-iterations", 120, "DAFL generator+student steps per epoch "
                                "(reference: 120).", low=1)
    dafl_batch: int = _key("dafl-batch", 1024, "DAFL generated images per step "
                           "(reference, CIFAR-10: 1024).", low=2)
    dafl_gen_lr: float = _key("dafl-gen-lr", 0.02, "DAFL generator Adam rate "
                              "(reference, CIFAR-10: 0.02).", low=0.0, low_open=True, high=10.0)
    dafl_student_lr: float = _key("dafl-student-lr", 0.1,
                                  "DAFL student SGD rate (momentum 0.9, weight decay 5e-4, x0.1 "
                                  "at 40% and 80% of the epochs; reference, CIFAR-10: 0.1).",
                                  low=0.0, low_open=True, high=10.0)
    dafl_latent: int = _key("dafl-latent", 1000, "DAFL latent size (reference, CIFAR-10: 1000).",
                            low=1)
    dafl_ce_weight: float = _key("dafl-ce-weight", 0.05, "DAFL one-hot loss weight "
                                 "(reference, CIFAR-10: 0.05).", low=0.0)
    dafl_ie_weight: float = _key("dafl-ie-weight", 5.0, "DAFL information-entropy (class "
                                 "balance) loss weight (reference: 5).", low=0.0)
    dafl_act_weight: float = _key("dafl-act-weight", 0.01, "DAFL activation loss weight "
                                  "(reference, CIFAR-10: 0.01).", low=0.0)

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.min_clients > self.num_clients:
            raise ConfigError(
                f"min-clients={self.min_clients} exceeds num-clients={self.num_clients}"
            )
        if self.num_clusters > self.num_clients:
            raise ConfigError(
                f"num-clusters={self.num_clusters} must be <= num-clients={self.num_clients}"
            )
        if self.dataset == "custom" and not self.data_path and not (self.in_channels
                                                                  and self.num_classes):
            raise ConfigError("dataset='custom' needs data-path (an npz archive), or "
                              "in-channels and num-classes when every site sets data-path in "
                              "its node config (deployment)")
        try:
            parse_site_nodes(self.site_nodes)
        except ValueError as err:
            raise ConfigError(f"site-nodes: {err}") from err
        if self.output_dir and not Path(self.output_dir).is_absolute():
            raise ConfigError(f"output-dir must be an absolute path, got {self.output_dir!r}")
        if (problem := kd_batch_problem(self.kd_batch, self.synth_batch)) is not None:
            raise ConfigError(f"kd-batch {problem}")
        if self.run_name and (self.run_name in (".", "..") or "/" in self.run_name
                              or "\\" in self.run_name or "\0" in self.run_name):
            raise ConfigError(f"run-name must be one folder name inside output-dir (no '/', "
                              f"'\\' or '..'), got {self.run_name!r}")
        _ = self.method_list  # validates the names of `methods`
        if self.resume and not self.run_name:
            raise ConfigError("resume=true needs run-name (the run folder to continue)")

    # ------------------------------------------------------------------------------------
    @property
    def effective_min_clients(self) -> int:
        """Fewest answering clients phase 1 accepts."""
        return self.min_clients or self.num_clients

    @property
    def method_list(self) -> list[str]:
        """The server methods of the run: ``methods`` split at commas, else ``[method]``.

        Raises
        ------
        ConfigError
            On an unknown or repeated name, or a multi-round method that is not the only one
            and last (it retrains the clients, whose f_i the later methods would then use).
        """
        names = [m.strip() for m in self.methods.split(",") if m.strip()] or [self.method]
        if self.methods.strip() and not self.methods.replace(",", "").strip():
            raise ConfigError(f"run-config key 'methods' names no method: {self.methods!r} "
                              "(leave it empty to run `method` alone)")
        known, multiround = method_names(), method_names(kind="multi-round")
        for name in names:
            if name not in known:
                raise ConfigError(f"run-config key 'methods': unknown method {name!r}; known: "
                                  f"{', '.join(known)}")
        if len(set(names)) < len(names):
            raise ConfigError(f"run-config key 'methods' names a method twice: {self.methods!r}")
        rounds = [i for i, m in enumerate(names) if m in multiround]
        if len(rounds) > 1 or (rounds and rounds[0] != len(names) - 1):
            raise ConfigError(f"run-config key 'methods': a multi-round method "
                              f"({', '.join(multiround)}) retrains the clients, so at most "
                              f"one may be listed, as the last; got {self.methods!r}")
        return names

    @property
    def sites_bring_data(self) -> bool:
        """Deployment: every site reads its own archive and the server holds no dataset."""
        return self.dataset == "custom" and not self.data_path

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (kebab-case keys).

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or a value out of range.
        """
        by_key = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in by_key:
                raise ConfigError(f"unknown run-config key {key!r}; known keys: "
                                  f"{', '.join(sorted(by_key))}")
            f = by_key[key]
            kwargs[f.name] = _coerce(key, value, type(f.default))
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping (inverse of :meth:`from_run_config`)."""
        return {f.metadata["key"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **overrides: Any) -> "RunConfig":
        """A copy with some fields (snake_case names) changed, validated again."""
        return dataclasses.replace(self, **overrides)

    def summary(self) -> str:
        """One line per key, for the log."""
        return "\n".join(f"  {k} = {v!r}" for k, v in self.to_run_config().items())


def parse_site_nodes(text: str) -> dict[int, int]:
    """``"0=123, 1=456"`` -> ``{0: 123, 1: 456}`` (partition-id -> Flower node id).

    Raises
    ------
    ValueError
        A pair that is not ``int=int``, a negative partition-id, or a partition or node named
        twice.
    """
    out: dict[int, int] = {}
    for pair in (p.strip() for p in text.replace(";", ",").split(",")):
        if not pair:
            continue
        pid_text, sep, node_text = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            pid, node = int(pid_text), int(node_text)
        except ValueError:
            raise ValueError(f"{pair!r} is not partition-id=node-id (two integers)") from None
        if pid < 0:
            raise ValueError(f"partition-id {pid} is negative")
        if pid in out:
            raise ValueError(f"partition-id {pid} is bound twice")
        if node in out.values():
            raise ValueError(f"node {node} is bound to two partitions")
        out[pid] = node
    return out


def _coerce(key: str, value: Any, want: type) -> Any:
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run-config key {key!r} must be a boolean, got {value!r}")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"run-config key {key!r} must be an integer, got {value!r}")
        return value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config key {key!r} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run-config key {key!r} must be a string, got {value!r}")
    return value


def _check_value(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    key = meta["key"]
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"run-config key {key!r} must be one of {list(meta['choices'])}, "
                          f"got {value!r}")
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return
    if value != value:  # NaN
        raise ConfigError(f"run-config key {key!r} must be a number, got NaN")
    bad_low = low is not None and (value <= low if meta["low_open"] else value < low)
    bad_high = high is not None and value > high
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        bracket = "(" if meta["low_open"] else "["
        raise ConfigError(f"run-config key {key!r} must be in {bracket}{lo}, {hi}], "
                          f"got {value!r}")


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a preset (a flat TOML file of run-config keys, as ``flwr run --run-config`` takes)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preset {path} does not exist")
    with path.open("rb") as fh:
        try:
            return tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"preset {path} is not valid TOML: {err}") from err


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"key=value key2='str'"`` exactly as ``flwr run --run-config`` does (TOML)."""
    if not text.strip():
        return {}
    import shlex

    toml_lines = "\n".join(shlex.split(text, posix=False))
    try:
        return tomllib.loads(toml_lines)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"cannot parse run-config overrides {text!r}: {err}") from err


def markdown_table() -> str:
    """docs/CONFIG.md's run-config table, generated from the dataclass."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(RunConfig):
        m = f.metadata
        if m["choices"]:
            allowed = ", ".join(m["choices"])
        elif m["low"] is not None or m["high"] is not None:
            lo = "" if m["low"] is None else f"{'>' if m['low_open'] else '>='} {m['low']:g}"
            hi = "" if m["high"] is None else f"<= {m['high']:g}"
            allowed = " and ".join(x for x in (lo, hi) if x)
        else:
            allowed = ""
        rows.append(f"| `{m['key']}` | `{f.default!r}` | {allowed} | {m['doc']} |")
    return "\n".join(rows)
