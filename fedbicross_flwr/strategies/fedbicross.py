"""FedBiCross (Xia et al.) as a Flower strategy: clusters, trajectory synthesis, bi-level
cross-cluster weights on the server; each client personalizes its cluster model G_k.
"""

from __future__ import annotations

from typing import Any

from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.methods.fedbicross import fedbicross
from fedbicross_flwr.strategies.base import OneShotStrategy

S = FedBiCrossSettings  # the defaults below are its fields' (the paper's values)


class FedBiCross(OneShotStrategy):
    """FedBiCross: a personalized, data-free, one-shot strategy.

    Round 1: every node trains its model once and uploads it; the server clusters the
    uploads by their predictions on M noise images (K-means, K clusters), synthesizes T
    DeepInversion steps of B images per cluster (keeping the trajectory, with noise-adapted
    teachers) and distils one model G_k per cluster while learning the cross-cluster weights
    by online bi-level optimization (Stages 1-2 of the paper). Each node then receives its
    cluster's G_k and personalizes it (Eq. 9). ``Result.arrays`` stays empty unless K = 1:
    the clients receive different models (:attr:`models`, :attr:`clusters`).

    Parameters
    ----------
    num_clusters : int (default: 2)
        K, the number of client clusters (reduced to the number of uploads when larger).
    noise_samples : int (default: 256)
        M, the noise images whose predictions cluster the clients.
    synth_steps : int (default: 500)
        T, DeepInversion steps (the length of the kept trajectory).
    synth_batch : int (default: 256)
        B, synthetic images per cluster.
    server_epochs : int (default: 1)
        Repeats of synthesis and bi-level KD with fresh noise.
    synth_lr : float (default: 0.05)
        eta_s, Adam rate on the synthetic images.
    bn_weight, tv_weight : float (default: 10.0, 2.5e-5)
        alpha_BN and alpha_TV of Eq. 2.
    kd_temperature : float (default: 20.0)
        tau of Eq. 5.
    student_lr : float (default: 0.01)
        eta_G, SGD rate of the cluster models (Eq. 7).
    weight_lr : float (default: 0.01)
        eta_w, step of the cross-cluster weights (Eq. 8).
    weights_mode : str (default: "bilevel")
        ``bilevel`` (the paper) or a fixed ablation: ``intra``, ``uniform``, ``similarity``.
    **kwargs
        The arguments of :class:`~fedbicross_flwr.strategies.base.OneShotStrategy` (seed,
        device, nodes, output folder) and any other key of
        :class:`~fedbicross_flwr.fedbicross.config.FedBiCrossSettings` (``kd_passes``,
        ``student_init``, ``noise_teacher_mode``, ...; docs/CONFIG.md lists them all).
    """

    method_name = "fedbicross"
    sections = (FedBiCrossSettings,)

    def __init__(self, *, num_clusters: int = S.num_clusters,
                 noise_samples: int = S.noise_samples, synth_steps: int = S.synth_steps,
                 synth_batch: int = S.synth_batch, server_epochs: int = S.server_epochs,
                 synth_lr: float = S.synth_lr, bn_weight: float = S.bn_weight,
                 tv_weight: float = S.tv_weight, kd_temperature: float = S.kd_temperature,
                 student_lr: float = S.student_lr, weight_lr: float = S.weight_lr,
                 weights_mode: str = S.weights_mode, **kwargs: Any) -> None:
        super().__init__(num_clusters=num_clusters, noise_samples=noise_samples,
                         synth_steps=synth_steps, synth_batch=synth_batch,
                         server_epochs=server_epochs, synth_lr=synth_lr, bn_weight=bn_weight,
                         tv_weight=tv_weight, kd_temperature=kd_temperature,
                         student_lr=student_lr, weight_lr=weight_lr,
                         weights_mode=weights_mode, **kwargs)

    @property
    def settings(self) -> FedBiCrossSettings:
        """Every setting of Stages 1-2, as the algorithm core reads them."""
        return FedBiCrossSettings.of(self.run_config)

    def server_method(self, inp: MethodInput) -> MethodOutput:
        """Stages 1-2: each partition gets its cluster's G_k."""
        return fedbicross(inp)


__all__ = ["FedBiCross"]
