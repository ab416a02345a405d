"""Cache of trained client models for one-process experiments (simulation only).

Clients are trained once per (dataset, partition, local-training settings) and reused by every
method and every later run. An entry is a folder ``<cache-dir>/<key>/`` with ``clients.pt``
(the phase-1 replies) and ``meta.json`` (what produced them and the file's sha256); a stale or
corrupt entry is detected, logged and retrained, never silently used.

``clients.pt`` holds ``replies`` (partition -> ``state`` and ``metrics``), ``failures`` (the
fields of :class:`~fedbicross_flwr.protocol.ClientFailure`) and ``own`` (partition -> the
client's model f_i). On reading, every model goes through
:func:`~fedbicross_flwr.protocol.validate_upload` as if its client had just sent it (ResNet-18
of the run's shape, finite, bounded, a usable forward pass) and the rest is checked for its
types and ranges. A ``meta.json`` or ``clients.pt`` that is refused is named in one warning
line and set aside as ``<name>.bad`` (:func:`~.checkpoint_io.set_aside`); the clients are
retrained.

While phase 1 runs, each client is also kept as it finishes (``client-<pid>.pt`` with its
sha256 in ``client-<pid>.sha256``, in the same entry folder), so a phase 1 that is stopped
half-way (hours of local training at the paper's 100 epochs on a CPU) resumes with the clients
still to train; :func:`save` removes them once ``clients.pt`` holds them all. A kept client is
checked as ``clients.pt`` is, and a refused one is set aside and retrained. Each client's
training is seeded by its partition id alone, so a resumed phase 1 gives the models an
uninterrupted one gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fedbicross_flwr import __version__
from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.model import build_resnet18, probe_for
from fedbicross_flwr.protocol import validate_upload
from fedbicross_flwr.storage.atomic import write_text
from fedbicross_flwr.storage.checkpoint_io import (
    CheckpointRefused,
    load_plain,
    load_with_sidecar,
    save_plain,
    save_with_sidecar,
    set_aside,
)
from fedbicross_flwr.storage.payload_checks import PayloadError, items, record, whole

# Keys that change what phase 1 produces.
PRODUCER_KEYS = ("dataset", "data-dir", "data-path", "in-channels", "num-classes",
                 "model-width", "seed",
                 "num-clients", "alpha", "min-partition-size", "val-fraction", "local-epochs",
                 "local-lr", "local-momentum", "local-weight-decay", "batch-size", "precision",
                 "eval-precision")


def producer(cfg: SharedConfig) -> dict[str, Any]:
    """What produced the client models (also written to meta.json)."""
    values = cfg.to_run_config()
    return {"version": __version__, "torch": torch.__version__,
            **{k: values[k] for k in PRODUCER_KEYS}}


def cache_key(cfg: SharedConfig) -> str:
    """Short hash of :func:`producer`: the cache entry of a run config's clients."""
    blob = json.dumps(producer(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load(cache_dir: Path, cfg: SharedConfig, shape: tuple[int, int]) -> Any | None:
    """The cached payload (plain data, checked by :func:`check_clients`), or None when absent,
    stale (logged), or refused: altered, not plain tensor data, or not this run's clients
    (logged and set aside).
    """
    entry = cache_dir / cache_key(cfg)
    data, meta_path = entry / "clients.pt", entry / "meta.json"
    if not data.is_file() or not meta_path.is_file():
        return None
    try:
        meta = record(json.loads(meta_path.read_bytes()), "meta.json", ("producer", "sha256"))
    except (OSError, ValueError, RecursionError) as err:  # unreadable, not JSON, malformed
        _refuse(meta_path, f"client cache {meta_path} is refused: {err}")
        return None
    if meta["producer"] != producer(cfg):
        log(logging.WARNING, "client cache %s: produced by other settings; retraining", entry)
        return None
    try:  # sha256 checked, then read with torch.load(weights_only=True): data, never code
        payload = load_plain(data, meta["sha256"] if isinstance(meta["sha256"], str) else None)
        check_clients(payload, cfg, shape)
    except CheckpointRefused as err:
        _refuse(data, f"client cache {entry}: {err}")
        return None
    except PayloadError as err:
        _refuse(data, f"client cache {data} does not hold this run's clients: {err}")
        return None
    log(logging.INFO, "client cache hit: %s", entry)
    return payload


def _refuse(path: Path, reason: str) -> None:
    """One warning line; the file set aside as ``<name>.bad``."""
    aside = set_aside(path)
    log(logging.WARNING, "%s; set aside as %s, retraining", " ".join(reason.split())[:500],
        aside.name)


def check_clients(payload: Any, cfg: SharedConfig, shape: tuple[int, int]) -> None:
    """A cached ``clients.pt`` of this run config (see the module docstring); ``shape`` is the
    dataset's ``(in_channels, num_classes)`` (the run config may leave them 0: from the data).

    Raises
    ------
    PayloadError
        Naming the first thing that is not what phase 1 of this run would have produced.
    """
    reference = build_resnet18(*shape, cfg.model_width).state_dict()
    probe = probe_for(reference)
    last = cfg.num_clients - 1
    record(payload, "", ("replies", "failures", "own"))
    for part in ("replies", "own"):
        if not isinstance(payload[part], dict):
            raise PayloadError(f"[{part!r}] is a {type(payload[part]).__name__}, not a dict")
    if set(payload["replies"]) != set(payload["own"]):
        raise PayloadError("['replies'] and ['own'] hold other partitions")
    for pid, reply in payload["replies"].items():
        whole(pid, f"a partition of ['replies'] ({pid!r})", 0, last)
        record(reply, f"['replies'][{pid}]", ("state", "metrics"))
        _metrics(reply["metrics"], f"['replies'][{pid}]['metrics']")
        for where, state in ((f"['replies'][{pid}]['state']", reply["state"]),
                             (f"['own'][{pid}]", payload["own"][pid])):
            if (problem := validate_upload(state, reference, probe)) is not None:
                raise PayloadError(f"{where}: {problem}")
    for i, failure in enumerate(items(payload["failures"], "['failures']")):
        where = f"['failures'][{i}]"
        record(failure, where, ("partition_id", "node", "phase", "reason"))
        if failure["partition_id"] is not None:
            whole(failure["partition_id"], f"{where}['partition_id']", 0, last)
        for key in ("node", "phase", "reason"):
            if not isinstance(failure[key], str):
                raise PayloadError(f"{where}[{key!r}] is a {type(failure[key]).__name__}, "
                                   "not a str")


def _metrics(value: Any, where: str) -> None:
    """A reply's metrics: names to real numbers (their ranges are checked by the server, as
    for a live reply, :func:`~fedbicross_flwr.protocol.metrics_problem`).
    """
    if not isinstance(value, dict):
        raise PayloadError(f"{where} is a {type(value).__name__}, not a dict")
    for name, number in value.items():
        if not isinstance(name, str) or isinstance(number, bool) or not isinstance(
                number, (int, float)):
            raise PayloadError(f"{where} holds {name!r}: {number!r}, not a name and a number")


def _check_client(payload: Any, cfg: SharedConfig, shape: tuple[int, int], where: str) -> None:
    """One kept client (:func:`save_client`): its reply's model as an upload of this run (of
    the dataset's ``shape``), its metrics names to numbers; else :class:`PayloadError`.
    """
    reference = build_resnet18(*shape, cfg.model_width).state_dict()
    record(payload, where, ("state", "metrics"))
    _metrics(payload["metrics"], f"{where}['metrics']")
    if (problem := validate_upload(payload["state"], reference, probe_for(reference))) is not None:
        raise PayloadError(f"{where}['state']: {problem}")


def save(cache_dir: Path, cfg: SharedConfig, payload: Any) -> Path:
    """Store ``payload`` (tensors, numpy arrays, plain containers) with its checksum; returns
    the entry folder.
    """
    entry = cache_dir / cache_key(cfg)
    entry.mkdir(parents=True, exist_ok=True)
    digest = save_plain(payload, entry / "clients.pt")
    write_text(entry / "meta.json", json.dumps(
        {"producer": producer(cfg), "sha256": digest}, indent=2))
    for kept in [*entry.glob("client-*"), entry / "meta-clients.json"]:  # now in clients.pt
        if not kept.name.endswith(".bad"):
            kept.unlink(missing_ok=True)
    return entry


def save_client(cache_dir: Path, cfg: SharedConfig, pid: int, payload: Any) -> None:
    """Keep one finished client (``payload``: its reply and model, plain data) until the whole
    phase 1 is stored by :func:`save`.
    """
    entry = cache_dir / cache_key(cfg)
    entry.mkdir(parents=True, exist_ok=True)
    write_text(entry / "meta-clients.json", json.dumps({"producer": producer(cfg)}, indent=2))
    save_with_sidecar(payload, entry / f"client-{pid}.pt", entry / f"client-{pid}.sha256")


def load_clients(cache_dir: Path, cfg: SharedConfig, shape: tuple[int, int]) -> dict[int, Any]:
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
            payload = load_with_sidecar(path, path.with_suffix(".sha256"))
            _check_client(payload, cfg, shape, path.name)
        except (CheckpointRefused, PayloadError) as err:
            _refuse(path, f"client cache {path}: {err}")
            continue
        kept[int(pid_text)] = payload
    if kept:
        log(logging.INFO, "client cache: %d of %d clients already trained in %s", len(kept),
            cfg.num_clients, entry)
    return kept
