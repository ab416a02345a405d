"""The contract between the one-shot protocol and a server method."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.protocol import ClientUpload, StateDict
from fedbicross_flwr.storage.atomic import open_text

__all__ = ["ClientUpload", "MethodInput", "MethodOutput", "ServerMethod", "StateDict"]


@dataclass(frozen=True)
class MethodInput:
    """Everything a server method may use: models and public metadata, never client data."""

    uploads: list[ClientUpload]  # sorted by partition_id
    cfg: RunConfig
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
