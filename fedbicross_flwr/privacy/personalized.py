"""The personalized models of a finished one-process run, recomputed for the privacy audit.

A client keeps its personalized model; the run folder does not store it. Personalization
(Eq. 9) is a seeded function of the client's data, its own phase-1 model f_i and the model it
received, so the audit recomputes it:

* f_i: the trained-client cache (``own``), as for the uploads;
* the received model: for ``fedbicross``, the cluster models G_k from the last bi-level
  checkpoint (``checkpoints/epoch<e>-bilevel.pt``, kept when the run had
  ``keep-checkpoints=true``; read weights-only with its sha256 checked) and the client's
  cluster from ``clusters.csv``; for ``fedavg1``, the num-examples-weighted average of the
  uploads; for ``local``, the client's own upload. Other methods are not recomputed.

The recomputation is checked against the run: each client's official-test accuracy before and
after personalization must equal the run's ``clients.csv`` (``reproduced`` in the report).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.site import SiteData

StateDict = dict[str, torch.Tensor]


class NotRecomputable(RuntimeError):
    """The run does not hold what recomputing its personalized models needs."""


def received_models(run_dir: Path, cfg: RunConfig, replies: dict[int, dict[str, Any]]
                    ) -> dict[int, StateDict]:
    """Each client's received model (partition-id -> state); ``replies``: the cached uploads
    (``state`` and ``metrics``).

    Raises
    ------
    NotRecomputable
        Another method, or a FedBiCross run whose bi-level checkpoint / clusters.csv is absent
        or refused.
    """
    from fedbicross_flwr.model import weighted_average

    if cfg.method == "local":
        return {pid: r["state"] for pid, r in replies.items()}
    if cfg.method == "fedavg1":
        pids = sorted(replies)
        avg = weighted_average([replies[p]["state"] for p in pids],
                               [float(replies[p]["metrics"]["num-examples"]) for p in pids])
        return {pid: avg for pid in pids}
    if cfg.method != "fedbicross":
        raise NotRecomputable(f"method {cfg.method!r}: the audit recomputes the received "
                              "models of fedbicross (from its kept checkpoints), fedavg1 and "
                              "local runs only")
    students = _cluster_models(run_dir, cfg)
    clusters_csv = run_dir / "clusters.csv"
    if not clusters_csv.is_file():
        raise NotRecomputable(f"run {run_dir.name} has no clusters.csv")
    with clusters_csv.open() as fh:
        clusters = {int(r["partition-id"]): int(r["cluster"]) for r in csv.DictReader(fh)}
    if not all(0 <= k < len(students) for k in clusters.values()):
        raise NotRecomputable(f"{clusters_csv} names clusters {sorted(set(clusters.values()))}, "
                              f"the checkpoint holds {len(students)} cluster models")
    return {pid: students[k] for pid, k in clusters.items()}


def _cluster_models(run_dir: Path, cfg: RunConfig) -> list[StateDict]:
    """The cluster models G_k of the last bi-level checkpoint, each checked as an upload is.

    Raises
    ------
    NotRecomputable
        No checkpoints, a manifest or a checkpoint that is refused (named, with the reason).
    """
    from fedbicross_flwr.fedbicross.checkpoint_checks import check_manifest
    from fedbicross_flwr.model import build_resnet18, probe_for
    from fedbicross_flwr.protocol import validate_upload
    from fedbicross_flwr.storage.checkpoint_io import CheckpointRefused, load_plain

    manifest = run_dir / "checkpoints" / "manifest.json"
    if not manifest.is_file():
        raise NotRecomputable(f"run {run_dir.name} kept no checkpoints; make the run with "
                              "keep-checkpoints=true to audit the personalized models")
    try:
        _, files = check_manifest(json.loads(manifest.read_bytes()))
    except (OSError, ValueError, RecursionError) as err:  # not JSON, or malformed
        raise NotRecomputable(f"checkpoint manifest {manifest} is refused: {err}") from err
    epochs = sorted(int(m.group(1)) for name in files
                    if (m := re.fullmatch(r"epoch(\d+)-bilevel", name)))
    if not epochs:
        raise NotRecomputable(f"the checkpoints of run {run_dir.name} hold no finished "
                              "bi-level epoch")
    path = manifest.parent / f"epoch{epochs[-1]}-bilevel.pt"
    try:
        payload = load_plain(path, files[path.stem])
    except CheckpointRefused as err:
        raise NotRecomputable(str(err)) from err
    students = payload.get("students") if isinstance(payload, dict) else None
    if not isinstance(students, list) or not students:
        raise NotRecomputable(f"checkpoint {path} holds no list of cluster models")
    reference = build_resnet18(cfg.in_channels, cfg.num_classes, cfg.model_width).state_dict()
    for k, state in enumerate(students):
        if (problem := validate_upload(state, reference, probe_for(reference))) is not None:
            raise NotRecomputable(f"checkpoint {path}: cluster model {k} is refused: {problem}")
    return students


def personalized_models(cfg: RunConfig, sites: dict[int, SiteData], own: dict[int, StateDict],
                        received: dict[int, StateDict], device: torch.device
                        ) -> tuple[dict[int, StateDict], dict[int, dict[str, float]]]:
    """Phase 3 again for every client with an own and a received model: (states, metrics)."""
    from fedbicross_flwr.client import run_personalization
    from fedbicross_flwr.model import load_resnet18

    states, metrics = {}, {}
    for pid in sorted(set(own) & set(received) & set(sites)):
        site = sites[pid]
        f_i, g = load_resnet18(own[pid]), load_resnet18(received[pid])
        student, metrics[pid] = run_personalization(cfg, site, f_i, g, device)
        states[pid] = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    return states, metrics


def reproduction(run_dir: Path, metrics: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Largest difference between the recomputed and the run's accuracies (clients.csv)."""
    with (run_dir / "clients.csv").open() as fh:
        rows = {int(r["partition-id"]): r for r in csv.DictReader(fh)}
    diffs = {key: max((abs(m[key] - float(rows[pid][key])) for pid, m in metrics.items()
                       if rows.get(pid, {}).get(key)), default=None)
             for key in ("acc-before", "acc-after")}
    ok = all(d is not None and d < 1e-6 for d in diffs.values())
    return {"reproduced": ok, **{f"max-abs-diff-{k}": d for k, d in diffs.items()}}
