"""FedISCA (Kang et al., 2023) as a Flower strategy: one global model for every client."""

from __future__ import annotations

from typing import Any

from fedbicross_flwr.distill.config import SynthesisConfig
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.methods.baselines.config import FedISCAConfig
from fedbicross_flwr.methods.baselines.fedisca import fedisca
from fedbicross_flwr.strategies.base import OneShotStrategy


class FedISCA(OneShotStrategy):
    """FedISCA: DeepInversion trajectories over ALL clients with one noise-adapted teacher,
    one KD step per trajectory step into one global model (``Result.arrays``).

    Parameters
    ----------
    fedisca_epochs : int (default: 0)
        Server epochs; 0 = ``server_epochs``, so that it runs at FedBiCross's budget
        (reference code: 100).
    fedisca_lr : float (default: 1e-3)
        Student SGD rate (momentum 0.9, weight decay 5e-4, x0.1 at 50 % and 75 %).
    server_epochs : int (default: 1)
        The server epochs ``fedisca_epochs=0`` stands for.
    synth_steps, synth_batch : int (default: 500, 256)
        T and B of the synthesis (shared with FedBiCross).
    student_init : str (default: "random")
        The global model's start: ``random`` (reference) or ``cluster-average`` (the clients'
        weighted average).
    **kwargs
        The arguments of :class:`~fedbicross_flwr.strategies.base.OneShotStrategy` and any
        other synthesis key (:class:`~fedbicross_flwr.distill.config.SynthesisConfig`).
    """

    method_name = "fedisca"
    sections = (SynthesisConfig, FedISCAConfig)
    extra_keys = ("server_epochs", "student_init", "compile", "compile_scope")

    def __init__(self, *, fedisca_epochs: int = FedISCAConfig.fedisca_epochs,
                 fedisca_lr: float = FedISCAConfig.fedisca_lr,
                 server_epochs: int = SynthesisConfig.server_epochs,
                 synth_steps: int = SynthesisConfig.synth_steps,
                 synth_batch: int = SynthesisConfig.synth_batch,
                 student_init: str = SynthesisConfig.student_init, **kwargs: Any) -> None:
        super().__init__(fedisca_epochs=fedisca_epochs, fedisca_lr=fedisca_lr,
                         server_epochs=server_epochs, synth_steps=synth_steps,
                         synth_batch=synth_batch, student_init=student_init, **kwargs)

    def server_method(self, inp: MethodInput) -> MethodOutput:
        """The distilled global model, for every partition."""
        return fedisca(inp)


__all__ = ["FedISCA"]
