"""What a method costs in communication: the bytes each client sends and receives.

On the Flower path the bytes are measured on the real messages: the sum of the serialized
objects of a message's object tree, each object once (Flower sends an object by its id, so
identical chunks travel once). The direct engine has no messages; it counts the model arrays
by :func:`state_bytes`, the formula the measured bytes are checked against in the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a model's arrays: sum over tensors of numel x element size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def message_bytes(message: Any) -> int:
    """Bytes of a Flower message as it travels: its object tree, each object once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def add_traffic(total: dict[int, int], more: Mapping[int, int]) -> dict[int, int]:
    """``total`` with ``more`` added per partition (in place; returned)."""
    for pid, n in more.items():
        total[pid] = total.get(pid, 0) + int(n)
    return total


__all__ = ["add_traffic", "message_bytes", "state_bytes"]
