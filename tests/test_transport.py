"""Both transports implement the whole Transport interface, with its signatures."""

from __future__ import annotations

import inspect

import pytest

from fedbicross_flwr.transports.direct import DirectTransport
from fedbicross_flwr.transports.grid_transport import GridTransport
from fedbicross_flwr.transports.transport import Transport

PHASES = ("collect_models", "num_sites", "train_round", "personalize")


@pytest.mark.parametrize("cls", [DirectTransport, GridTransport])
def test_a_transport_implements_every_phase_of_the_interface(cls) -> None:
    members = {n for n, _ in inspect.getmembers(Transport, inspect.isfunction)
               if not n.startswith("_")}
    assert members == set(PHASES)
    for name in PHASES:
        expected = inspect.signature(getattr(Transport, name))
        actual = inspect.signature(getattr(cls, name))
        assert list(actual.parameters) == list(expected.parameters), (cls.__name__, name)
