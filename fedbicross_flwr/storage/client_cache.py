"""Cache of trained client models for one-process experiments (simulation only).

Clients are trained once per (dataset, partition, local-training settings) and reused by every
method and every later run. An entry is a folder ``<cache-dir>/<key>/`` with ``clients.pt``
(the phase-1 replies) and ``meta.json`` (what produced them and the file's sha256); a stale or
corrupt entry is detected, logged and retrained, never silently used.

While phase 1 runs, each client is also kept as it finishes (``client-<pid>.pt`` with its
sha256 in ``client-<pid>.sha256``, in the same entry folder), so a phase 1 that is stopped
half-way (hours of local training at the paper's 100 epochs on a CPU) resumes with the clients
still to train; :func:`save` removes them once ``clients.pt`` holds them all. Each client's training is seeded by its partition id alone, so a resumed
phase 1 gives the models an uninterrupted one gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fedbicross_flwr import __version__
from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.storage.atomic import write_text
from fedbicross_flwr.storage.checkpoint_io import (
    CheckpointRefused,
    load_plain,
    load_with_sidecar,
    save_plain,
    save_with_sidecar,
)

# Keys that change what phase 1 produces.
PRODUCER_KEYS = ("dataset", "data-dir", "data-path", "in-channels", "num-classes",
                 "model-width", "seed",
                 "num-clients", "alpha", "min-partition-size", "val-fraction", "local-epochs",
                 "local-lr", "local-momentum", "local-weight-decay", "batch-size", "precision",
                 "eval-precision")


def producer(cfg: RunConfig) -> dict[str, Any]:
    """What produced the client models (also written to meta.json)."""
    values = cfg.to_run_config()
    return {"version": __version__, "torch": torch.__version__,
            **{k: values[k] for k in PRODUCER_KEYS}}


def cache_key(cfg: RunConfig) -> str:
    """Short hash of :func:`producer`: the cache entry of a run config's clients."""
    blob = json.dumps(producer(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load(cache_dir: Path, cfg: RunConfig) -> Any | None:
    """The cached payload (plain data), or None when absent, stale, altered or not plain tensor
    data (logged).
    """
    entry = cache_dir / cache_key(cfg)
    data, meta_path = entry / "clients.pt", entry / "meta.json"
    if not data.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        log(logging.WARNING, "client cache %s: unreadable meta.json; retraining", entry)
        return None
    if meta.get("producer") != producer(cfg):
        log(logging.WARNING, "client cache %s: produced by other settings; retraining", entry)
        return None
    try:  # sha256 checked, then read with torch.load(weights_only=True): data, never code
        payload = load_plain(data, meta.get("sha256"))
    except CheckpointRefused as err:
        log(logging.WARNING, "client cache %s: %s; retraining", entry, err)
        return None
    log(logging.INFO, "client cache hit: %s", entry)
    return payload


def save(cache_dir: Path, cfg: RunConfig, payload: Any) -> Path:
    """Store ``payload`` (tensors, numpy arrays, plain containers) with its checksum; returns
    the entry folder.
    """
    entry = cache_dir / cache_key(cfg)
    entry.mkdir(parents=True, exist_ok=True)
    digest = save_plain(payload, entry / "clients.pt")
    write_text(entry / "meta.json", json.dumps(
        {"producer": producer(cfg), "sha256": digest}, indent=2))
    for kept in [*entry.glob("client-*"), entry / "meta-clients.json"]:  # now in clients.pt
        kept.unlink(missing_ok=True)
    return entry


def save_client(cache_dir: Path, cfg: RunConfig, pid: int, payload: Any) -> None:
    """Keep one finished client (``payload``: its reply and model, plain data) until the whole
    phase 1 is stored by :func:`save`.
    """
    entry = cache_dir / cache_key(cfg)
    entry.mkdir(parents=True, exist_ok=True)
    write_text(entry / "meta-clients.json", json.dumps({"producer": producer(cfg)}, indent=2))
    save_with_sidecar(payload, entry / f"client-{pid}.pt", entry / f"client-{pid}.sha256")


def load_clients(cache_dir: Path, cfg: RunConfig) -> dict[int, Any]:
    """The clients kept by :func:`save_client` for this run config, by partition id; a file
    that is altered, not plain data or from other settings is logged and left out (retrained).
    """
    entry = cache_dir / cache_key(cfg)
    try:
        meta = json.loads((entry / "meta-clients.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(meta, dict) or meta.get("producer") != producer(cfg):
        log(logging.WARNING, "client cache %s: kept clients of other settings; retraining", entry)
        return {}
    kept: dict[int, Any] = {}
    for path in sorted(entry.glob("client-*.pt")):
        pid_text = path.stem.removeprefix("client-")
        if not pid_text.isdigit() or int(pid_text) >= cfg.num_clients:
            continue
        try:
            kept[int(pid_text)] = load_with_sidecar(path, path.with_suffix(".sha256"))
        except CheckpointRefused as err:
            log(logging.WARNING, "client cache %s: %s; retraining that client", path, err)
    if kept:
        log(logging.INFO, "client cache: %d of %d clients already trained in %s", len(kept),
            cfg.num_clients, entry)
    return kept
