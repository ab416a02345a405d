"""What a client's one upload reveals about its training images: membership inference.

``fedbicross privacy-audit RUN_DIR --client-cache DIR`` audits a finished one-process run
(``fedbicross run --client-cache DIR``: simulation, where every client's data is at hand and
the uploads are stored in the trained-client cache). For each client's uploaded model f_i it
attacks membership of the client's own training images (members) against images of the
official test split that f_i never saw (non-members). The non-members are the client's
label-following test split (official-test images drawn to follow the client's label
distribution), so the attack cannot win by label skew alone.

Two attacks, each scored with scikit-learn's ROC AUC and the TPR at 1 % FPR:

* ``loss``: the loss-threshold attack (Yeom et al., 2018), score = -CE(f_i(x), y);
* ``calibrated``: the loss calibrated by the example's difficulty (Watson et al., 2022),
  score = mean over the OTHER clients' uploads of CE(f_j(x), y) - CE(f_i(x), y). The other
  clients never trained on client i's images (disjoint partitions), so they serve as reference
  models.

An AUC of 0.5 and a TPR at 1 % FPR of 0.01 mean the attacker does no better than chance. The
audit covers the uploads only: synthetic images and personalized models are not audited here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbicross_flwr.config import RunConfig

AUDIT_DIR = "privacy"
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


def audit_uploads(cfg: RunConfig, states: dict[int, dict[str, torch.Tensor]],
                  device: torch.device) -> list[ClientAudit]:
    """Membership inference on every uploaded model (``states``: partition-id -> state)."""
    from fedbicross_flwr.data import load_dataset
    from fedbicross_flwr.model import build_resnet18
    from fedbicross_flwr.site import site_from_partition

    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                      cfg.in_channels, cfg.num_classes)
    models = {}
    for pid, state in sorted(states.items()):
        model = build_resnet18(ds.in_channels, ds.num_classes)
        model.load_state_dict(state)
        models[pid] = model
    audits = []
    for pid, model in models.items():
        site = site_from_partition(ds, cfg, pid, cfg.num_clients)
        xs = torch.cat([site.x_train, site.x_test_personal])
        ys = torch.cat([site.y_train, site.y_test_personal])
        member = np.r_[np.ones(site.n_train, bool), np.zeros(len(site.y_test_personal), bool)]
        own = example_losses(model, xs, ys, device)
        others = [example_losses(m, xs, ys, device) for q, m in models.items() if q != pid]
        calibrated = None
        if others:
            reference = np.mean(others, axis=0) - own
            calibrated = attack_score(reference[member], reference[~member])
        audits.append(ClientAudit(pid, int(member.sum()), int((~member).sum()),
                                  float(own[member].mean()), float(own[~member].mean()),
                                  attack_score(-own[member], -own[~member]), calibrated))
    return audits


def stored_uploads(run_dir: Path, cache_dir: Path) -> tuple[RunConfig, dict[int, dict]]:
    """The run's config and its clients' uploads from the trained-client cache.

    Raises
    ------
    AuditError
        No run folder or run_config.json, or no cache entry for this run's clients.
    """
    from fedbicross_flwr import client_cache

    config_path = run_dir / "run_config.json"
    if not config_path.is_file():
        raise AuditError(f"{run_dir} is not a run folder (no run_config.json)")
    cfg = RunConfig.from_run_config(json.loads(config_path.read_text()))
    if cfg.dataset == "custom" and not cfg.data_path:
        raise AuditError(f"run {run_dir} read its data at the sites (deployment); the audit "
                         "needs the clients' data at hand (a one-process run)")
    cached = client_cache.load(cache_dir, cfg)
    if cached is None:
        raise AuditError(f"no trained clients of run {run_dir} in the client cache {cache_dir} "
                         f"(entry {client_cache.cache_key(cfg)}); make the run with "
                         "`fedbicross run --client-cache DIR`")
    return cfg, {int(pid): reply["state"] for pid, reply in cached["replies"].items()}


def write_audit(run_dir: Path, audits: list[ClientAudit]) -> Path:
    """``<run>/privacy/membership.csv`` (one row per client) and ``membership.json``."""
    import csv

    out = run_dir / AUDIT_DIR
    out.mkdir(exist_ok=True)
    rows = [audit_row(a) for a in audits]
    with (out / "membership.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"low-fpr": LOW_FPR, "clients": [asdict(a) for a in audits],
               **{f"{k}-mean": _mean([r[k] for r in rows]) for k in rows[0]
                  if k.endswith(("auc", "fpr"))}}
    (out / "membership.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def audit_row(a: ClientAudit) -> dict[str, float | int | None]:
    """One flat row of the CSV."""
    cal = a.calibrated_attack
    return {"partition-id": a.partition_id, "n-members": a.n_members,
            "n-nonmembers": a.n_nonmembers, "member-loss": a.member_loss,
            "nonmember-loss": a.nonmember_loss, "loss-auc": a.loss_attack.auc,
            "loss-tpr-at-1pct-fpr": a.loss_attack.tpr_at_low_fpr,
            "calibrated-auc": cal.auc if cal else None,
            "calibrated-tpr-at-1pct-fpr": cal.tpr_at_low_fpr if cal else None}


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def format_table(audits: list[ClientAudit]) -> str:
    """A Markdown table of the audit (printed by the CLI)."""
    lines = ["| client | members | non-members | loss AUC | loss TPR@1%FPR | calibrated AUC "
             "| calibrated TPR@1%FPR |", "|---|---|---|---|---|---|---|"]
    for a in audits:
        cal = a.calibrated_attack
        lines.append(f"| {a.partition_id} | {a.n_members} | {a.n_nonmembers} | "
                     f"{a.loss_attack.auc:.3f} | {a.loss_attack.tpr_at_low_fpr:.3f} | "
                     f"{cal.auc:.3f} | {cal.tpr_at_low_fpr:.3f} |" if cal else
                     f"| {a.partition_id} | {a.n_members} | {a.n_nonmembers} | "
                     f"{a.loss_attack.auc:.3f} | {a.loss_attack.tpr_at_low_fpr:.3f} | - | - |")
    return "\n".join(lines)
