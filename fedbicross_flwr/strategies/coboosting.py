"""Co-Boosting (Dai et al., ICLR 2024) as a Flower strategy: one global model for every
client.
"""

from __future__ import annotations

from typing import Any

from fedbicross_flwr.distill.config import SynthesisConfig
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.methods.baselines.coboosting import coboosting
from fedbicross_flwr.methods.baselines.config import CoBoostingConfig, GeneratorConfig
from fedbicross_flwr.strategies.base import OneShotStrategy

G, C = GeneratorConfig, CoBoostingConfig  # the reference code's defaults


class CoBoosting(OneShotStrategy):
    """Co-Boosting: hard-sample generation, per-client ensemble weights learned by sign
    gradient, ODS-perturbed KD into one global model (``Result.arrays``).

    Parameters
    ----------
    gen_epochs : int (default: 200)
        Epochs: one generator round adds a batch to the pool, then one KD pass over it.
    gen_steps : int (default: 30)
        Generator Adam steps per epoch.
    gen_batch : int (default: 256)
        Images per generator round, and the KD batch size.
    gen_kd_lr : float (default: 0.01)
        Student SGD rate.
    coboosting_kd_temperature : float (default: 4.0)
        KD temperature.
    coboosting_weight_lr : float (default: 0.01)
        Sign-gradient step mu of the ensemble weights.
    student_init : str (default: "random")
        The global model's start: ``random`` (reference) or ``cluster-average``.
    **kwargs
        The arguments of :class:`~fedbicross_flwr.strategies.base.OneShotStrategy` and any
        other generator or Co-Boosting key
        (:mod:`fedbicross_flwr.methods.baselines.config`).
    """

    method_name = "coboosting"
    sections = (GeneratorConfig, CoBoostingConfig)
    extra_keys = ("student_init",)

    def __init__(self, *, gen_epochs: int = G.gen_epochs, gen_steps: int = G.gen_steps,
                 gen_batch: int = G.gen_batch, gen_kd_lr: float = G.gen_kd_lr,
                 coboosting_kd_temperature: float = C.coboosting_kd_temperature,
                 coboosting_weight_lr: float = C.coboosting_weight_lr,
                 student_init: str = SynthesisConfig.student_init, **kwargs: Any) -> None:
        super().__init__(gen_epochs=gen_epochs, gen_steps=gen_steps, gen_batch=gen_batch,
                         gen_kd_lr=gen_kd_lr,
                         coboosting_kd_temperature=coboosting_kd_temperature,
                         coboosting_weight_lr=coboosting_weight_lr,
                         student_init=student_init, **kwargs)

    def server_method(self, inp: MethodInput) -> MethodOutput:
        """The distilled global model, for every partition."""
        return coboosting(inp)


__all__ = ["CoBoosting"]
