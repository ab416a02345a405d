"""FedAvg-1 as a Flower strategy: one round of FedAvg, then the clients personalize."""

from __future__ import annotations

from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.methods.fedavg import fedavg1
from fedbicross_flwr.strategies.base import OneShotStrategy


class FedAvgOneShot(OneShotStrategy):
    """FedAvg-1: the data-size weighted average of the one-shot uploads, sent to every client.

    Unlike Flower's ``FedAvg`` with ``num_rounds=1``, the average includes BatchNorm's
    buffers, the uploads pass the project's checks, and every client then personalizes the
    average with its own model (Eq. 9). ``Result.arrays`` is the average.

    Parameters
    ----------
    **kwargs
        The arguments of :class:`~fedbicross_flwr.strategies.base.OneShotStrategy`; the
        method has no settings of its own.
    """

    method_name = "fedavg1"

    def server_method(self, inp: MethodInput) -> MethodOutput:
        """The weighted average, for every partition."""
        return fedavg1(inp)


__all__ = ["FedAvgOneShot"]
