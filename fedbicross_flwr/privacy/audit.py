"""What a client's data leaks through a finished run: ``fedbicross privacy-audit``.

``fedbicross privacy-audit RUN_DIR --client-cache DIR`` audits a finished one-process run
(``fedbicross run --client-cache DIR``: simulation, where every client's data is at hand and
the uploads are stored in the trained-client cache), in three parts:

(a) membership inference on each client's uploaded model f_i: the client's own training images
    (members) against its label-following test split (official-test images drawn to follow the
    client's label distribution, never seen by f_i: non-members), so the attack cannot win by
    label skew alone;
(b) the server's synthetic images against the clients' training images and the official test
    split (:mod:`fedbicross_flwr.privacy.nearest`);
(c) the membership inference of (a) on each client's personalized model, recomputed from the
    run (:mod:`fedbicross_flwr.privacy.personalized`).

Two attacks, each scored with scikit-learn's ROC AUC and the TPR at 1 % FPR:

* ``loss``: the loss-threshold attack (Yeom et al., 2018), score = -CE(f(x), y);
* ``calibrated``: the loss calibrated by the example's difficulty (Watson et al., 2022),
  score = mean over the OTHER clients' uploads of CE(f_j(x), y) - CE(f(x), y). The other
  clients never trained on client i's images (disjoint partitions), so their uploads serve as
  reference models, for the uploads and for the personalized models alike.

An AUC of 0.5 and a TPR at 1 % FPR of 0.01 mean the attacker does no better than chance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import DatasetArrays, load_dataset
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.reports.results import finite_mean

if TYPE_CHECKING:
    from fedbicross_flwr.data.site import SiteData

LOW_FPR = 0.01


class AuditError(RuntimeError):
    """The run cannot be audited (no run folder, no stored uploads, no data)."""


@dataclass(frozen=True)
class AttackScore:
    """How well one attack separates members from non-members."""

    auc: float  # ROC AUC (0.5 = chance)
    tpr_at_low_fpr: float  # TPR at FPR <= 1 % (0.01 = chance)


@dataclass(frozen=True)
class ClientAudit:
    """Membership inference against one client's upload."""

    partition_id: int
    n_members: int
    n_nonmembers: int
    member_loss: float  # mean CE on the members
    nonmember_loss: float  # mean CE on the non-members
    loss_attack: AttackScore
    calibrated_attack: AttackScore | None  # None with a single client (no reference model)


def attack_score(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                 low_fpr: float = LOW_FPR) -> AttackScore:
    """ROC AUC and TPR at ``low_fpr`` of scores that should be higher for members.

    Raises
    ------
    ValueError
        No members or no non-members.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ValueError("membership inference needs members and non-members, got "
                         f"{len(member_scores)} and {len(nonmember_scores)}")
    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    scores = np.r_[member_scores, nonmember_scores].astype(np.float64)
    fpr, tpr, _ = roc_curve(truth, scores)
    return AttackScore(float(roc_auc_score(truth, scores)),
                       float(tpr[fpr <= low_fpr].max(initial=0.0)))


def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Per-example cross-entropy of an eval-mode model, fp32, on the CPU."""
    model.to(device).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            logits = model(x[i:i + batch_size].to(device)).float()
            out.append(F.cross_entropy(logits, y[i:i + batch_size].to(device),
                                       reduction="none").cpu())
    model.cpu()
    return torch.cat(out).numpy() if out else np.zeros(0)


def audit_models(sites: dict[int, SiteData], states: dict[int, dict[str, torch.Tensor]],
                 references: dict[int, dict[str, torch.Tensor]], device: torch.device
                 ) -> list[ClientAudit]:
    """Membership inference on every model of ``states`` (partition-id -> state).

    Client i's model is attacked on its training images (members) against its label-following
    test split (non-members); the calibrated attack uses ``references``' models of the OTHER
    clients (the uploads: they never saw client i's images).
    """
    from fedbicross_flwr.model import load_resnet18

    def model_of(state: dict[str, torch.Tensor], site: SiteData) -> nn.Module:
        return load_resnet18(state)

    audits = []
    for pid, state in sorted(states.items()):
        site = sites[pid]
        xs = torch.cat([site.x_train, site.x_test_personal])
        ys = torch.cat([site.y_train, site.y_test_personal])
        member = np.r_[np.ones(site.n_train, bool), np.zeros(len(site.y_test_personal), bool)]
        own = example_losses(model_of(state, site), xs, ys, device)
        others = [example_losses(model_of(ref, site), xs, ys, device)
                  for q, ref in sorted(references.items()) if q != pid]
        calibrated = None
        if others:
            reference = np.mean(others, axis=0) - own
            calibrated = attack_score(reference[member], reference[~member])
        audits.append(ClientAudit(pid, int(member.sum()), int((~member).sum()),
                                  float(own[member].mean()), float(own[~member].mean()),
                                  attack_score(-own[member], -own[~member]), calibrated))
    return audits


def stored_run(run_dir: Path, cache_dir: Path
               ) -> tuple[RunConfig, dict[str, Any], DatasetArrays]:
    """The run's config, its clients' cache entry (``replies``: the uploads, ``own``: the
    phase-1 models f_i) and its dataset.

    Raises
    ------
    AuditError
        No run folder or run_config.json, or no cache entry for this run's clients.
    """
    from fedbicross_flwr.storage import client_cache

    config_path = run_dir / "run_config.json"
    if not config_path.is_file():
        raise AuditError(f"{run_dir} is not a run folder (no run_config.json)")
    cfg = RunConfig.from_run_config(json.loads(config_path.read_text()))
    if cfg.dataset == "custom" and not cfg.data_path:
        raise AuditError(f"run {run_dir} read its data at the sites (deployment); the audit "
                         "needs the clients' data at hand (a one-process run)")
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                      cfg.in_channels, cfg.num_classes)
    cached = client_cache.load(cache_dir, cfg, (ds.in_channels, ds.num_classes))
    if cached is None:
        raise AuditError(f"no trained clients of run {run_dir} in the client cache {cache_dir} "
                         f"(entry {client_cache.cache_key(cfg)}); make the run with "
                         "`fedbicross run --client-cache DIR`")
    return cfg, cached, ds


def run_audit(run_dir: Path, cache_dir: Path, device: torch.device,
              n_pairs: int = 8) -> dict[str, Any]:
    """Audit a finished one-process run: (a) the uploads, (b) the synthetic images, (c) the
    personalized models; writes ``privacy-audit.{json,md,csv}`` and the pairs picture into the
    run folder and returns the report. A part that the run cannot support (a method without
    synthetic images, no kept checkpoints) is reported with the reason, not raised.
    """
    import time

    from fedbicross_flwr.data.site import site_from_partition, to_tensors
    from fedbicross_flwr.privacy.report import write_report

    start = time.perf_counter()
    cfg, cached, ds = stored_run(run_dir, cache_dir)
    uploads = {int(pid): reply["state"] for pid, reply in cached["replies"].items()}
    sites = {pid: site_from_partition(ds, cfg, pid, cfg.num_clients) for pid in uploads}
    log(INFO, "privacy audit of %s: (a) membership inference on %d uploads", run_dir.name,
        len(uploads))
    report: dict[str, Any] = {
        "run": run_dir.name, "method": cfg.method, "dataset": cfg.dataset,
        "num-clients": cfg.num_clients, "alpha": cfg.alpha, "seed": cfg.seed,
        "low-fpr": LOW_FPR, "uploads": membership_part(audit_models(sites, uploads, uploads,
                                                                      device))}
    test = to_tensors(ds.test.images, ds.test.labels)[0]
    control = to_tensors(ds.val.images, ds.val.labels)[0] if len(ds.val) else None
    train = torch.cat([sites[pid].x_train for pid in sorted(sites)])
    report["synthetic"], pictures = synthetic_part(run_dir, cfg, train, test, control, n_pairs)
    report["personalized"] = personalized_part(run_dir, cfg, sites, cached, uploads, device)
    report["wall-time-s"] = round(time.perf_counter() - start, 1)
    write_report(run_dir, report, pictures)
    return report


def membership_part(audits: list[ClientAudit]) -> dict[str, Any]:
    """(a)/(c) as JSON: every client and the means over clients."""
    rows = [audit_row(a) for a in audits]
    return {"clients": [asdict(a) for a in audits], "rows": rows,
            "means": {k: finite_mean([r[k] for r in rows]) for k in rows[0]
                      if k.endswith(("auc", "fpr"))} if rows else {}}


def synthetic_part(run_dir: Path, cfg: RunConfig, train: torch.Tensor, test: torch.Tensor,
                   control: torch.Tensor | None, n_pairs: int
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(b): nearest training vs nearest test image of every synthetic image of the run."""
    from fedbicross_flwr.methods.catalog import method_names
    from fedbicross_flwr.privacy.nearest import nearest_audit, to_pixels

    path = run_dir / "synthetic.pt"
    if cfg.method not in method_names(distils=True):
        return {"available": False, "reason": f"method {cfg.method!r} synthesizes no images"}, None
    if not path.is_file():
        return {"available": False, "reason": f"run {run_dir.name} has no synthetic.pt"}, None
    images = torch.cat(torch.load(path, map_location="cpu", weights_only=True)["images"])
    log(INFO, "privacy audit: (b) nearest neighbours of %d synthetic images", len(images))
    result, train_px, test_px = nearest_audit(images, train, test, control, cfg.seed)
    part = {"available": True, "images": int(len(images)), "similarity": "pixel SSIM",
            "train-images": result.train_available, "test-images": result.test_available,
            "pool-size": result.pool_size,
            "subsampled": ("train" if result.train_available > result.pool_size else
                           "test" if result.test_available > result.pool_size else None),
            "subsample-seed": cfg.seed, "synthetic": asdict(result.synthetic),
            "control-official-val": asdict(result.control) if result.control else None,
            "ssim-nearest-train-mean": float(result.best_train.mean()),
            "ssim-nearest-test-mean": float(result.best_test.mean()),
            "ssim-nearest-train-max": float(result.best_train.max())}
    return part, {"synthetic": to_pixels(images), "train": train_px, "test": test_px,
                  "result": result, "n_pairs": n_pairs}


def personalized_part(run_dir: Path, cfg: RunConfig, sites: dict, cached: dict[str, Any],
                      uploads: dict[int, dict[str, torch.Tensor]], device: torch.device
                      ) -> dict[str, Any]:
    """(c): membership inference on the recomputed personalized models."""
    from fedbicross_flwr.privacy.personalized import (
        NotRecomputable,
        personalized_models,
        received_models,
        reproduction,
    )

    try:
        received = received_models(run_dir, cfg, {int(pid): reply for pid, reply
                                                  in cached["replies"].items()})
    except NotRecomputable as err:
        return {"available": False, "reason": str(err)}
    own = {int(pid): state for pid, state in cached["own"].items()}
    log(INFO, "privacy audit: (c) recomputing the personalized models of %d clients",
        len(set(own) & set(received)))
    states, metrics = personalized_models(cfg, sites, own, received, device)
    check = reproduction(run_dir, metrics)
    if not check["reproduced"]:
        log(WARNING, "privacy audit: the recomputed personalization differs from the run's "
            "clients.csv: %s", check)
    source = ("the kept bi-level checkpoint" if cfg.method == "fedbicross" else "the uploads")
    return {"available": True, "source": f"recomputed from {source} and the cached client "
            "models", **check,
            **membership_part(audit_models(sites, states, uploads, device))}


def audit_row(a: ClientAudit) -> dict[str, float | int | None]:
    """One flat row of the CSV."""
    cal = a.calibrated_attack
    return {"partition-id": a.partition_id, "n-members": a.n_members,
            "n-nonmembers": a.n_nonmembers, "member-loss": a.member_loss,
            "nonmember-loss": a.nonmember_loss, "loss-auc": a.loss_attack.auc,
            "loss-tpr-at-1pct-fpr": a.loss_attack.tpr_at_low_fpr,
            "calibrated-auc": cal.auc if cal else None,
            "calibrated-tpr-at-1pct-fpr": cal.tpr_at_low_fpr if cal else None}
