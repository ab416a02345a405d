"""The run-config keys of the paper's data-free baselines, one small section per method.

Defaults are the reference codes' values (see each method's docstring); ``conf/cpu.toml`` holds
CPU-scale values. All four distil into ONE global model from a random start (or from the
clients' average with ``student-init='cluster-average'``). FedISCA's synthesis also reads
FedBiCross's synthesis keys (:mod:`fedbicross_flwr.fedbicross.config`). This module imports no
torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbicross_flwr.keys.fields import Section, key


@dataclass(frozen=True)
class FedISCAConfig(Section):
    """FedISCA (:mod:`.fedisca`): its epochs and student rate."""

    # 0 (default): FedBiCross's server-epochs, so that the two run at the same E, T and B in
    # every comparison (the reference's 100 epochs are conf/paper.toml's server-epochs).
    fedisca_epochs: int = key(0,
                              "FedISCA server epochs: synthesis over ALL clients with fresh "
                              "noise, noise adaptation, one KD step per trajectory step; 0 = "
                              "server-epochs, FedBiCross's budget (reference: 100). Synthesis "
                              "uses synth-*, kd-batch, tv-weight, bn-weight, bn-reduction, "
                              "ensemble, jitter and noise-teacher-mode.", low=0)
    fedisca_lr: float = key(1e-3,
                            "FedISCA student SGD rate (momentum 0.9, weight decay 5e-4, x0.1 "
                            "at 50% and 75% of the epochs; reference: 1e-3).",
                            low=0.0, low_open=True, high=10.0)


@dataclass(frozen=True)
class GeneratorConfig(Section):
    """The generator and its KD pass, shared by DENSE and Co-Boosting (:mod:`.generator`)."""

    gen_epochs: int = key(200,
                          "DENSE / Co-Boosting epochs: one generator round adds a batch to the "
                          "synthetic pool, then one KD pass over the pool (reference: 200).",
                          low=1)
    gen_steps: int = key(30, "DENSE / Co-Boosting generator Adam steps per epoch "
                         "(reference g_steps: 30).", low=1)
    gen_batch: int = key(256, "DENSE / Co-Boosting synthetic images per "
                         "generator round, and the KD batch size (reference: 256).", low=2)
    gen_lr: float = key(1e-3, "DENSE / Co-Boosting generator (and latent) Adam rate "
                        "(reference: 1e-3, betas 0.5/0.999).", low=0.0, low_open=True, high=10.0)
    gen_latent: int = key(256, "DENSE / Co-Boosting latent size nz "
                          "(reference: 256).", low=1)
    gen_bn_weight: float = key(1.0,
                               "DENSE weight of the BN-statistics loss (sum over the BN layers "
                               "of all clients; reference: 1). Co-Boosting uses none "
                               "(its reference default bn=0).", low=0.0)
    gen_ce_weight: float = key(1.0, "DENSE / Co-Boosting weight of the "
                               "generator's CE (Co-Boosting: hard-sample CE) (reference: 1).",
                               low=0.0)
    gen_adv_weight: float = key(1.0, "DENSE / Co-Boosting weight of the "
                                "adversarial (negative student-ensemble KL) term (reference: 1).",
                                low=0.0)
    gen_kd_lr: float = key(0.01, "DENSE / Co-Boosting student SGD rate "
                           "(momentum 0.9; reference: 0.01).", low=0.0, low_open=True, high=10.0)


@dataclass(frozen=True)
class DenseConfig(Section):
    """DENSE (:mod:`.dense`), beyond the generator keys."""

    dense_kd_temperature: float = key(20.0,
                                      "DENSE KD temperature (reference: 20).",
                                      low=0.0, low_open=True)


@dataclass(frozen=True)
class CoBoostingConfig(Section):
    """Co-Boosting (:mod:`.coboosting`), beyond the generator keys."""

    coboosting_kd_temperature: float = key(4.0,
                                           "Co-Boosting KD temperature (reference: 4).",
                                           low=0.0, low_open=True)
    coboosting_weight_lr: float = key(0.01,
                                      "Co-Boosting sign-gradient step mu of the per-client "
                                      "ensemble weights (reference: 0.01).", low=0.0)
    coboosting_weight_decay: float = key(0.99,
                                         "Co-Boosting step decay: the weight step at epoch e is "
                                         "mu * decay^e (reference wdc: 0.99).",
                                         low=0.0, high=1.0)
    coboosting_ods_eta: float = key(8 / 255,
                                    "Co-Boosting ODS perturbation size on the (normalised) KD "
                                    "inputs; 0 = no ODS (reference: 8/255).", low=0.0, high=1.0)
    coboosting_hard_power: float = key(1.0,
                                       "Co-Boosting hard-sample CE exponent: (1 - p_y)^power * "
                                       "CE (reference hs: 1).", low=0.0, high=10.0)


@dataclass(frozen=True)
class DAFLConfig(Section):
    """DAFL (:mod:`.dafl`)."""

    dafl_epochs: int = key(2000, "DAFL epochs (reference, CIFAR-10 recipe for "
                           "a ResNet-18 student: 2000).", low=1)
    dafl_iterations: int = key(120, "DAFL generator+student steps per epoch "
                               "(reference: 120).", low=1)
    dafl_batch: int = key(1024, "DAFL generated images per step "
                          "(reference, CIFAR-10: 1024).", low=2)
    dafl_gen_lr: float = key(0.02, "DAFL generator Adam rate "
                             "(reference, CIFAR-10: 0.02).", low=0.0, low_open=True, high=10.0)
    dafl_student_lr: float = key(0.1,
                                 "DAFL student SGD rate (momentum 0.9, weight decay 5e-4, x0.1 "
                                 "at 40% and 80% of the epochs; reference, CIFAR-10: 0.1).",
                                 low=0.0, low_open=True, high=10.0)
    dafl_latent: int = key(1000, "DAFL latent size (reference, CIFAR-10: 1000).",
                           low=1)
    dafl_ce_weight: float = key(0.05, "DAFL one-hot loss weight "
                                "(reference, CIFAR-10: 0.05).", low=0.0)
    dafl_ie_weight: float = key(5.0, "DAFL information-entropy (class "
                                "balance) loss weight (reference: 5).", low=0.0)
    dafl_act_weight: float = key(0.01, "DAFL activation loss weight "
                                 "(reference, CIFAR-10: 0.01).", low=0.0)


__all__ = ["CoBoostingConfig", "DAFLConfig", "DenseConfig", "FedISCAConfig", "GeneratorConfig"]
