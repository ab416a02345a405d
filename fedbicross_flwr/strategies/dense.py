"""DENSE (Zhang et al., NeurIPS 2022) as a Flower strategy: one global model for every client."""

from __future__ import annotations

from typing import Any

from fedbicross_flwr.distill.config import SynthesisConfig
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.methods.baselines.config import DenseConfig, GeneratorConfig
from fedbicross_flwr.methods.baselines.dense import dense
from fedbicross_flwr.strategies.base import OneShotStrategy

G = GeneratorConfig  # the reference code's defaults


class DENSE(OneShotStrategy):
    """DENSE: a generator trained on the BN prior, CE and a masked adversarial loss against
    the client ensemble; the global model (``Result.arrays``) is distilled on its pool.

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
    dense_kd_temperature : float (default: 20.0)
        KD temperature.
    student_init : str (default: "random")
        The global model's start: ``random`` (reference) or ``cluster-average``.
    **kwargs
        The arguments of :class:`~fedbicross_flwr.strategies.base.OneShotStrategy` and any
        other generator key (:class:`~fedbicross_flwr.methods.baselines.config.GeneratorConfig`).
    """

    method_name = "dense"
    sections = (GeneratorConfig, DenseConfig)
    extra_keys = ("student_init",)

    def __init__(self, *, gen_epochs: int = G.gen_epochs, gen_steps: int = G.gen_steps,
                 gen_batch: int = G.gen_batch, gen_kd_lr: float = G.gen_kd_lr,
                 dense_kd_temperature: float = DenseConfig.dense_kd_temperature,
                 student_init: str = SynthesisConfig.student_init, **kwargs: Any) -> None:
        super().__init__(gen_epochs=gen_epochs, gen_steps=gen_steps, gen_batch=gen_batch,
                         gen_kd_lr=gen_kd_lr, dense_kd_temperature=dense_kd_temperature,
                         student_init=student_init, **kwargs)

    def server_method(self, inp: MethodInput) -> MethodOutput:
        """The distilled global model, for every partition."""
        return dense(inp)


__all__ = ["DENSE"]
