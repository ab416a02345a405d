"""The run-config keys of the data-free distillation toolkit: trajectory DeepInversion (Eq. 1-2),
the noise-adapted teacher (Eq. 3) and the soft labels and KD batches (Eq. 5).

FedBiCross (:mod:`fedbicross_flwr.fedbicross.config` adds its own keys) and FedISCA read them.
:class:`SynthesisSettings` is what :mod:`.synthesis` and :mod:`.noise_adapt` read: these keys,
the shared keys ``seed``, ``precision``, ``compile`` and ``compile-scope``, and the
engineering constant ``label_chunk``. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbicross_flwr.keys.fields import Section, key, same_key
from fedbicross_flwr.keys.sections import ExecutionConfig, TaskConfig


def kd_batch_problem(kd_batch: int, synth_batch: int) -> str | None:
    """Why ``kd_batch`` cannot cut batches of ``synth_batch`` images, or None."""
    if kd_batch and (kd_batch < 2 or synth_batch % kd_batch):
        return f"must be 0 or a divisor >= 2 of synth-batch={synth_batch}, got {kd_batch}"
    return None


@dataclass(frozen=True)
class SynthesisConfig(Section):
    """The keys every distilling method shares: the server epochs, the student's start, the
    trajectory synthesis, the noise adaptation and the KD batches.
    """

    # Synthetic images per KD step (0 = synth_batch: the paper's one step per trajectory step).
    # A large synthesis batch B (DeepInversion: 256, many distinct images) is then cut into
    # B / kd_batch KD steps per trajectory step, so the student sees more distinct images
    # without larger KD batches. B must be a multiple of it.
    kd_batch: int = key(0,
                        "Synthetic images per KD step: each trajectory step's B = synth-batch "
                        "images are cut into B / kd-batch KD steps (0 = B, paper: one KD step "
                        "per trajectory step). Used by fedbicross and fedisca.", low=0)
    # Server epochs: synthesis + noise adaptation + bi-level KD repeated with fresh noise;
    # cluster models, momentum buffers and weights carry over (FedISCA uses 100; paper: silent).
    server_epochs: int = key(1,
                             "Repeats of synthesis + bi-level with fresh noise.", low=1)
    # The student's start (FedBiCross's G_k^(0), a baseline's global model): 'random'
    # (Algorithm 1, line 11; the reference codes) or 'cluster-average', the data-size weighted
    # parameter average of the cluster's members (a baseline: of all clients) (they share the initial model w^(0), as in
    # FedAvg). A deviation for small server budgets: with a few hundred inner steps a randomly
    # initialised ResNet-18 is still far from its teachers.
    student_init: str = key("random",
                            "G_k^(0): random (Algorithm 1) or cluster-average (data-size "
                            "weighted average of the cluster's client models).",
                            choices=("random", "cluster-average"))
    # T, synthesis iterations = length of the stored trajectory x^(1..T).
    synth_steps: int = key(500, "T, DeepInversion iterations.", low=1)
    # B, synthetic images per cluster and per step.
    synth_batch: int = key(256, "B, synthetic images per cluster.", low=2)
    # eta_s, Adam learning rate on the input images.
    synth_lr: float = key(0.05, "Adam learning rate on the images (eta_s).",
                          low=0.0, low_open=True)
    # alpha_TV, weight of the total-variation prior R_TV (DeepInversion's L2 form, see
    # losses.tv_loss).
    tv_weight: float = key(2.5e-5, "alpha_TV of Eq. 2.", low=0.0)
    # alpha_BN, weight of the BatchNorm feature-statistics prior R_BN.
    bn_weight: float = key(10.0, "alpha_BN of Eq. 2.", low=0.0)
    # tau, KD temperature of Eq. 5 (losses are scaled by tau^2).
    kd_temperature: float = key(20.0, "tau of Eq. 5.",
                                low=0.0, low_open=True)
    # beta, "the momentum" of Eq. 3: mu~ <- beta * mu~ + (1 - beta) * mu(x), so beta weighs the
    # OLD value. The BN layers forwarding the reversed trajectory get PyTorch's
    # ``momentum = 1 - beta`` (PyTorch weighs the new batch), computed in noise_adapt only.
    noise_momentum: float = key(0.9,
                                "beta of Eq. 3, the momentum of the noise adaptation: the "
                                "weight of the old statistic (paper: 0.9).",
                                low=0.0, high=1.0)
    # Eq. 3 skips the trajectory steps whose total EMA weight is below this (the late steps,
    # weighted beta^(t-1)): every adapted statistic moves by at most cutoff x its spread.
    # 1e-7 is below float32 rounding of the EMA (L = 153 of T = 500 at beta = 0.9); 0 = all T.
    noise_ema_cutoff: float = key(1e-7,
                                  "Eq. 3: skip the late trajectory steps whose total EMA weight "
                                  "is below this (each adapted statistic moves by at most cutoff "
                                  "x its spread; 1e-7 is below float32 rounding; 0 = all T).",
                                  low=0.0, high=0.5)
    # 'eval' (paper): the adapted copy is used with its adapted running statistics.
    # 'train' (FedISCA code): the copy stays in train mode, so it uses per-batch statistics.
    noise_teacher_mode: str = key("eval",
                                  "Noise-adapted teacher used with its adapted statistics "
                                  "(eval, paper) or per-batch statistics (train, FedISCA code).",
                                  choices=("eval", "train"))
    # Ensemble teacher F_k. 'prob' (default): F_k(x) = mean_i softmax(f_i(x)), the paper's
    # formula, which averages the client outputs as probabilities like the clustering step
    # does. 'logit': softmax(mean_i f_i(x)) as in FedISCA's code; a prototype found it
    # over-confident (one member dominates) and it collapsed to one class on RetinaMNIST.
    ensemble: str = key("prob", "Ensemble teacher: mean of member probabilities "
                        "(prob, paper's F_k) or of logits (logit, FedISCA code).",
                        choices=("prob", "logit"))
    # How R_BN combines ensemble members (each member: sum over its BN layers).
    # 'mean' (default): average over members, so the CE/BN balance does not depend on the
    # cluster size (clusters of 1 and of 8 clients get the same effective alpha_BN).
    # 'sum': FedISCA's code, which makes the BN term grow linearly with the cluster size.
    bn_reduction: str = key("mean", "R_BN over cluster members: mean (does not "
                            "grow with cluster size) or sum (FedISCA code).",
                            choices=("mean", "sum"))
    # Random roll jitter (pixels, both axes, uniform in [-jitter, jitter]) applied to the images
    # before each synthesis forward pass (DeepInversion/FedISCA use 2 for 28x28 / 32x32).
    jitter: int = key(2, "Random roll of synthetic images, pixels.", low=0, high=8)


@dataclass(frozen=True)
class SynthesisSettings(SynthesisConfig):
    """What the synthesis and the noise adaptation read: the section plus the shared keys.

    Every value is checked against its key's range, and ``kd_batch`` against ``synth_batch``.
    """

    seed: int = same_key(TaskConfig, "seed")
    precision: str = same_key(ExecutionConfig, "precision")
    compile: bool = same_key(ExecutionConfig, "compile")
    compile_scope: str = same_key(ExecutionConfig, "compile_scope")
    # An engineering constant, not a run-config key (RunConfig does not include this class).
    label_chunk: int = key(8, "Trajectory steps forwarded together for soft labels (memory).",
                           low=1, constant=True)

    @property
    def compile_all(self) -> bool:
        """Whether every per-step loop runs compiled (``compile`` with ``compile-scope = all``),
        not only the synthesis forwards.
        """
        return self.compile and self.compile_scope == "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (problem := kd_batch_problem(self.kd_batch, self.synth_batch)) is not None:
            raise ValueError(f"kd_batch {problem}")


__all__ = ["SynthesisConfig", "SynthesisSettings", "kd_batch_problem"]
