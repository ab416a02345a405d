"""The one-shot protocol's types: what a client sends, what can go wrong, what is accepted.

This module imports nothing else from the package (only the standard library and torch), so
the server, the transports, the methods and the tests can all depend on it without cycles.

* :class:`ClientUpload` - a client's single accepted upload, as a server method sees it;
* :class:`ClientReply` - a phase-1 reply as a transport delivers it (not yet checked);
* :class:`ClientFailure` / :class:`PhaseResult` - what one phase brought back;
* :func:`validate_upload` - why an uploaded state dict is refused, or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpload:
    """One client's single upload (phase 1)."""

    partition_id: int  # stable client id (never the random Flower node id)
    state: StateDict  # the trained local model f_i (parameters and BN buffers, on the CPU)
    num_examples: int  # local training-set size (FedAvg weight)


@dataclass
class ClientReply:
    """A client's phase-1 answer: its model and metrics."""

    partition_id: int
    state: StateDict
    metrics: dict[str, float]


@dataclass
class ClientFailure:
    """A client that did not answer, answered with an error, or sent a bad model."""

    partition_id: int | None  # None when the client never said who it is
    node: str  # the transport's address of the client (Flower node id, or "local")
    phase: str  # "train" or "personalize"
    reason: str


@dataclass
class PhaseResult:
    """What one phase brought back."""

    replies: dict[int, Any] = field(default_factory=dict)  # partition-id -> reply
    failures: list[ClientFailure] = field(default_factory=list)


def validate_upload(state: StateDict, reference: StateDict) -> str | None:
    """Why an uploaded state dict is unusable, or None if it matches the reference model."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        return f"state dict keys differ from ResNet-18: missing {missing[:5]}, extra {extra[:5]}"
    head = [k for k, v in reference.items() if v.ndim == 2][-1:]  # the classifier's weight
    for key in head:
        got, want = tuple(state[key].shape), tuple(reference[key].shape)
        if got != want and len(got) == 2 and got[1:] == want[1:]:
            return (f"different number of classes: {key} has shape {got}, expected {want} "
                    f"({got[0]} classes instead of {want[0]})")
    for key, ref in reference.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{key} has dtype {got.dtype}, expected {ref.dtype}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"{key} contains NaN or Inf values"
    return None
