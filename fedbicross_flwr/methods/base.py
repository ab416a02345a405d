"""The contract between the one-shot protocol and a server method, and its check.

A server method is a function ``(MethodInput) -> MethodOutput``: the usable uploads in, one
model per partition out. :func:`run_method` is the one way the project runs one: it calls the
method and refuses to send a model that is missing or unusable (:func:`check_outgoing_models`).
A one-shot strategy's ``aggregate_uploads`` and the project's run (``run_server``, every
engine) both go through it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.protocol import ClientUpload, StateDict
from fedbicross_flwr.storage.atomic import open_text

__all__ = ["ClientUpload", "MethodInput", "MethodOutput", "ServerMethod", "StateDict",
           "check_finite_models", "check_outgoing_models", "run_method"]


@dataclass(frozen=True)
class MethodInput:
    """Everything a server method may use: models and public metadata, never client data."""

    uploads: list[ClientUpload]  # sorted by partition_id
    cfg: SharedConfig
    in_channels: int
    num_classes: int
    device: torch.device  # where the server-side computation runs
    run_dir: Path  # the run folder, for the method's own artefacts (plots, CSVs)
    round_model: StateDict | None = None  # a multi-round method's w^(R); None for one-shot

    def new_model(self) -> nn.Module:
        """A freshly initialised ResNet-18 of the run's shape (its ``model-width``), drawn from
        the global RNG.
        """
        return build_resnet18(self.in_channels, self.num_classes, self.cfg.model_width)


@dataclass
class MethodOutput:
    """One model per client (+ what the method wants to report)."""

    models: dict[int, StateDict]  # partition_id -> model to send for personalization
    clusters: dict[int, int] = field(default_factory=dict)  # partition_id -> cluster id
    diagnostics: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


ServerMethod = Callable[[MethodInput], MethodOutput]


def write_clusters_csv(run_dir: Path, clusters: dict[int, int]) -> Path:
    """``clusters.csv`` of a clustering method: one ``partition-id,cluster`` row per client."""
    path = run_dir / "clusters.csv"
    with open_text(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["partition-id", "cluster"])
        writer.writerows(sorted(clusters.items()))
    return path


def run_method(name: str, method: ServerMethod, inp: MethodInput,
               probe: Callable[[StateDict], str | None]) -> MethodOutput:
    """``method`` (the server method ``name``) on ``inp``; every partition's model checked
    before anything is sent.

    Raises
    ------
    RuntimeError
        The method returned no model for a partition of the uploads.
    FloatingPointError
        A model that is not usable (:func:`check_outgoing_models`).
    """
    out = method(inp)
    missing = sorted({u.partition_id for u in inp.uploads} - set(out.models))
    if missing:
        raise RuntimeError(f"method {name!r} returned no model for partitions {missing}")
    check_outgoing_models(name, out.models, inp.uploads, probe, inp.run_dir)
    return out


def check_outgoing_models(method: str, models: dict[int, StateDict],
                          uploads: list[ClientUpload],
                          probe: Callable[[StateDict], str | None], run_dir: Path) -> None:
    """Refuse to send a model that is not usable: non-finite values, a BatchNorm variance
    <= 0, or a forward pass on the fixed probe batch with non-finite or huge outputs.

    Raises
    ------
    FloatingPointError
        Naming the partitions, the first problem of each and the most extreme of the uploads
        the method was given (the likely culprit); nothing is sent, the run stops unfinished
        and the run folder (with its checkpoints) is kept.
    """
    check_finite_models(method, models, run_dir, uploads)
    bad = {}
    for pid, state in sorted(models.items()):
        variances = [k for k, v in state.items() if k.endswith("running_var")
                     and v.numel() and float(v.min()) <= 0]
        problem = (f"{variances[0]} has a BatchNorm variance <= 0" if variances
                   else probe(state))
        if problem is not None:
            bad[pid] = problem
    if bad:
        raise FloatingPointError(
            f"method {method!r} produced unusable models for partitions {sorted(bad)} "
            f"({bad}); {_most_extreme(uploads)}. Nothing was sent to the clients; the run "
            f"folder {run_dir} and its checkpoints are kept.")


def _most_extreme(uploads: list[ClientUpload]) -> str:
    """The accepted upload with the largest absolute value, to name as the likely culprit."""
    if not uploads:
        return "no uploads"
    scores = {}
    for u in uploads:
        name, value = max(((k, float(v.detach().abs().max())) for k, v in u.state.items()
                           if v.is_floating_point() and v.numel()),
                          key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf)
        scores[u.partition_id] = (value, name)
    pid = max(scores, key=lambda p: scores[p][0])
    value, name = scores[pid]
    return (f"the most extreme upload it was given is partition {pid}'s "
            f"(|{name}| up to {value:.3g})")


def check_finite_models(method: str, models: dict[int, StateDict], run_dir: Path,
                        uploads: list[ClientUpload] | None = None) -> None:
    """Refuse to send a non-finite model to a client (a diverged server stage).

    Raises
    ------
    FloatingPointError
        Naming the partitions and the first non-finite tensor of each; nothing is sent and the
        run folder (with its checkpoints) is kept.
    """
    bad = {}
    for pid, state in sorted(models.items()):
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad[pid] = name
                break
    if bad:
        raise FloatingPointError(
            f"method {method!r} produced non-finite models (NaN/Inf) for partitions "
            f"{sorted(bad)} (first bad tensor per partition: {bad})"
            + (f"; {_most_extreme(uploads)}" if uploads else "")
            + f"; nothing was sent to the clients. The run folder {run_dir} and its checkpoints "
            "are kept.")
