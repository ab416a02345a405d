"""DAFL (Chen et al., ICCV 2019) as a Flower strategy: one global model for every client."""

from __future__ import annotations

from typing import Any

from fedbicross_flwr.distill.config import SynthesisConfig
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.methods.baselines.config import DAFLConfig
from fedbicross_flwr.methods.baselines.dafl import dafl
from fedbicross_flwr.strategies.base import OneShotStrategy

D = DAFLConfig  # the reference code's CIFAR-10 recipe


class DAFL(OneShotStrategy):
    """DAFL: a generator trained on one-hot, information-entropy and activation losses of the
    client ensemble while the global model (``Result.arrays``) is distilled on its images.

    Parameters
    ----------
    dafl_epochs : int (default: 2000)
        Epochs.
    dafl_iterations : int (default: 120)
        Generator and student steps per epoch.
    dafl_batch : int (default: 1024)
        Generated images per step.
    dafl_student_lr : float (default: 0.1)
        Student SGD rate (x0.1 at 40 % and 80 % of the epochs).
    student_init : str (default: "random")
        The global model's start: ``random`` (reference) or ``cluster-average``.
    **kwargs
        The arguments of :class:`~fedbicross_flwr.strategies.base.OneShotStrategy` and any
        other DAFL key (:class:`~fedbicross_flwr.methods.baselines.config.DAFLConfig`).
    """

    method_name = "dafl"
    sections = (DAFLConfig,)
    extra_keys = ("student_init",)

    def __init__(self, *, dafl_epochs: int = D.dafl_epochs,
                 dafl_iterations: int = D.dafl_iterations, dafl_batch: int = D.dafl_batch,
                 dafl_student_lr: float = D.dafl_student_lr,
                 student_init: str = SynthesisConfig.student_init, **kwargs: Any) -> None:
        super().__init__(dafl_epochs=dafl_epochs, dafl_iterations=dafl_iterations,
                         dafl_batch=dafl_batch, dafl_student_lr=dafl_student_lr,
                         student_init=student_init, **kwargs)

    def server_method(self, inp: MethodInput) -> MethodOutput:
        """The distilled global model, for every partition."""
        return dafl(inp)


__all__ = ["DAFL"]
