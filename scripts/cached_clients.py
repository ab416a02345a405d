"""Shared by the diagnostic scripts: the cached phase-1 clients of a preset, and test accuracy.

Test accuracy here is only printed by diagnostics (choosing budgets by hand), never used by a
method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedbicross_flwr import client_cache
from fedbicross_flwr.config import RunConfig, load_preset, parse_overrides
from fedbicross_flwr.data import DatasetArrays, load_dataset
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.site import to_tensors
from fedbicross_flwr.training import predict_logits


@dataclass
class CachedClients:
    values: dict[str, Any]  # the run-config values (preset < overrides)
    cfg: RunConfig
    dataset: DatasetArrays
    x_test: torch.Tensor  # (N_test, C_in, H, W) official test images
    y_test: torch.Tensor  # (N_test,) labels
    replies: dict  # partition id -> phase-1 reply (state, metrics)

    def model(self, pid: int) -> torch.nn.Module:
        """Client ``pid``'s uploaded ResNet-18."""
        model = build_resnet18(self.dataset.in_channels, self.dataset.num_classes)
        model.load_state_dict(self.replies[pid].state)
        return model

    def accuracy(self, model: torch.nn.Module) -> float:
        """Official-test accuracy in % (eval mode, CPU)."""
        logits = predict_logits(model, self.x_test, torch.device("cpu"))
        return 100.0 * (logits.argmax(1) == self.y_test).float().mean().item()


def load_cached_clients(preset: Path, cache_dir: Path, overrides: str) -> CachedClients:
    """The preset's cached clients; exits with a message when the cache has no valid entry."""
    values = {**load_preset(preset), **parse_overrides(overrides)}
    cfg = RunConfig.from_run_config(values)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    cached = client_cache.load(cache_dir, cfg)
    if cached is None:
        raise SystemExit("no valid client-cache entry for this config: run the preset once first")
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download)
    x, y = to_tensors(ds.test.images, ds.test.labels)
    return CachedClients(values, cfg, ds, x, y, cached["phase1"].replies)
