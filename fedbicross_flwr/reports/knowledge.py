"""Where the knowledge goes: teacher -> synthetic images -> student -> received -> personalized.

Every distilling method loses part of what its teachers know. These functions measure each
stage on the official test split, so a bad final number can be traced to the stage that lost
it (``knowledge.json`` of a run, ``fedbicross distill-check``):

* teacher ceiling: accuracy of an ensemble teacher (mean of member probabilities, or a
  weighted mixture of cluster ensembles, as FedBiCross's G_k is taught);
* agreement: how often the student predicts the teacher's class, on synthetic and on real
  images;
* retention = student accuracy / accuracy of the teacher it was distilled from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.catalog import CATALOG, method_names
from fedbicross_flwr.model import resnet18_shape, weighted_average
from fedbicross_flwr.training import predict_logits


def mixture_probs(cluster_probs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_j w_j F_j(x): the teacher a student trained on the w-weighted KD losses imitates.

    Parameters
    ----------
    cluster_probs : Sequence[Tensor]
        K tensors (n, C), each cluster ensemble's probabilities on the same images.
    weights : Sequence[float]
        (K,) non-negative weights (one row of FedBiCross's cross-cluster weights).

    Returns
    -------
    Tensor
        (n, C) probabilities.
    """
    if len(cluster_probs) != len(weights):
        raise ValueError(f"{len(cluster_probs)} cluster teachers but {len(weights)} weights")
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"mixture weights must be non-negative with a positive sum, got {w}")
    w = w / w.sum()
    return torch.einsum("k,knc->nc", w, torch.stack(list(cluster_probs)).float())


def accuracy_of(probs: Tensor, labels: Tensor) -> float:
    """Share of rows whose argmax is the label."""
    return float((probs.argmax(dim=1) == labels.view(-1)).float().mean())


def agreement(student_logits: Tensor, teacher_probs: Tensor) -> float:
    """Share of images on which student and teacher predict the same class."""
    return float((student_logits.argmax(dim=1) == teacher_probs.argmax(dim=1)).float().mean())


def retention(student_acc: float, teacher_acc: float) -> float:
    """Student accuracy / teacher accuracy (NaN when the teacher scores 0)."""
    return student_acc / teacher_acc if teacher_acc > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# knowledge.json of a run
# ---------------------------------------------------------------------------------------------
def _member_outputs(states: Sequence[dict[str, Tensor]], x: Tensor, device: torch.device,
                    precision: str) -> Tensor:
    """(n_models, n, C) float32 logits of each state on ``x``, on CPU (shape from the state)."""
    from fedbicross_flwr.model import load_resnet18

    out = []
    for state in states:
        model = load_resnet18(state)
        out.append(predict_logits(model, x, device, precision=precision).float().cpu())
    return torch.stack(out)


def _ensemble(logits: Tensor, kind: str) -> Tensor:
    """(n_members, n, C) logits -> (n, C) probabilities: 'prob' (mean of softmax) or 'logit'."""
    if kind == "logit":
        return logits.mean(dim=0).softmax(dim=1)
    return logits.softmax(dim=2).mean(dim=0)


def knowledge_report(method: str, ensemble: str, uploads: Sequence[Any], models: dict[int, Any],
                     clusters: dict[int, int], final_weights: Any, rows: Sequence[dict],
                     test: tuple[Tensor, Tensor], in_channels: int, num_classes: int,
                     device: torch.device, precision: str = "fp32",
                     synthetic: dict[str, Any] | None = None,
                     student_init: str = "random") -> dict[str, Any]:
    """The knowledge flow of one finished run of a distilling method, on the official test split.

    Parameters
    ----------
    method : str
        Server method (a distilling one of :mod:`fedbicross_flwr.methods.catalog`).
    ensemble : str
        The run config's ``ensemble`` ('prob' or 'logit'), used where the method follows it.
    uploads : Sequence[ClientUpload]
        The client models f_i the method distilled from.
    models : dict[int, StateDict]
        partition-id -> received model (before personalization).
    clusters : dict[int, int]
        partition-id -> cluster (0 for the one-model methods).
    final_weights : array-like or None
        (K, K) FedBiCross cross-cluster weights (row k = target k); None: each received model
        was taught by the ensemble of ALL uploads.
    rows : Sequence[dict]
        The run's clients.csv rows (``acc-after`` per partition, ``status``).
    test : (Tensor, Tensor)
        Official test images (n, C_in, H, W) and labels (n,).
    synthetic : dict, optional
        ``{"images": [K x (m, C_in, H, W)]}``: each cluster's final synthetic images, for the
        student's agreement with its teacher on them.
    student_init : str
        The run's ``student-init``. 'cluster-average': the student started as the data-size
        weighted average of its teachers' uploads (FedBiCross: the cluster's; the one-model
        methods: all clients'), whose accuracy is reported as ``start-acc`` so that the
        server's distillation is judged against where it started; 'random': no start entry.

    Returns
    -------
    dict
        JSON-serialisable: per cluster the teacher ceilings, agreement, received and
        personalized accuracy and retention; ``stages``: the client-weighted means.
    """
    spec = CATALOG.get(method)
    kind = ensemble if spec is None or spec.teacher_ensemble == "config" else "logit"
    x, y = test
    pids = [u.partition_id for u in uploads]
    logits = _member_outputs([u.state for u in uploads], x, device,
                             precision)  # (N, n, C)
    all_probs = _ensemble(logits, kind)  # (n, C)
    num_clusters = max(clusters.values()) + 1 if clusters else 1
    cluster_probs = []
    for k in range(num_clusters):
        idx = [i for i, pid in enumerate(pids) if clusters.get(pid, 0) == k]
        cluster_probs.append(_ensemble(logits[idx], kind) if idx else all_probs)
    after = {r["partition-id"]: r.get("acc-after") for r in rows if r.get("status") == "ok"}
    per_cluster = []
    for k in range(num_clusters):
        members = [pid for pid in pids if clusters.get(pid, 0) == k]
        if not members:
            continue
        if final_weights is not None and num_clusters > 1:
            w = [float(v) for v in final_weights[k]]
            teacher = mixture_probs(cluster_probs, w)
        else:
            w, teacher = None, (cluster_probs[k] if final_weights is not None else all_probs)
        received = _member_outputs([models[members[0]]], x, device,
                                   precision)[0]  # (n, C)
        entry: dict[str, Any] = {
            "cluster": k, "members": members,
            "cluster-ensemble-acc": accuracy_of(cluster_probs[k], y),
            "teacher": ("sum_j w_kj F_j" if w is not None else
                        "F_k" if final_weights is not None else "ensemble of all uploads"),
            "weights": w, "teacher-acc": accuracy_of(teacher, y),
            "agreement-real": agreement(received, teacher),
            "received-acc": accuracy_of(received.softmax(1), y),
        }
        # the uploads that taught cluster k: its own (FedBiCross), else all of them
        taught_by = [u for u in uploads if final_weights is None
                     or clusters.get(u.partition_id, 0) == k]
        if student_init == "cluster-average":
            start = weighted_average([u.state for u in taught_by],
                                     [float(u.num_examples) for u in taught_by])
            entry["start-acc"] = accuracy_of(_member_outputs(
                [start], x, device, precision)[0].softmax(1), y)
        if synthetic is not None and k < len(synthetic.get("images", [])):
            images = synthetic["images"][k]
            entry["agreement-synthetic"] = _synthetic_agreement(
                [u.state for u in taught_by], models[members[0]], images, kind, device,
                precision)
            entry["synthetic-images"] = int(len(images))
        done = [a for p in members if (a := after.get(p)) is not None]
        entry["after-acc"] = sum(done) / len(done) if done else None
        entry["retention"] = retention(entry["received-acc"], entry["teacher-acc"])
        per_cluster.append(entry)
    return {"method": method, "split": "official test", "n-test": int(len(y)),
            "model-width": resnet18_shape(uploads[0].state)[2],
            "teacher-ensemble": kind, "stages": _stages(per_cluster, accuracy_of(all_probs, y)),
            "clusters": per_cluster}


def _synthetic_agreement(teachers: Sequence[dict[str, Tensor]], student: dict[str, Tensor],
                         images: Tensor, kind: str, device: torch.device,
                         precision: str) -> float:
    """Agreement of the received model with the ensemble of its teachers on synthetic images."""
    t_syn = _ensemble(_member_outputs(teachers, images, device, precision), kind)
    s_syn = _member_outputs([student], images, device, precision)[0]
    return agreement(s_syn, t_syn)


def _stages(per_cluster: Sequence[dict[str, Any]], all_acc: float) -> dict[str, float | None]:
    """The client-weighted means over the clusters of each stage of the knowledge flow."""

    def client_mean(key: str) -> float | None:
        vals = [(len(e["members"]), e[key]) for e in per_cluster if e.get(key) is not None]
        total = sum(n for n, _ in vals)
        return sum(n * v for n, v in vals) / total if total else None

    stages = {
        "all-client-ensemble-acc": all_acc,
        "teacher-acc": client_mean("teacher-acc"),
        "agreement-synthetic": client_mean("agreement-synthetic"),
        "agreement-real": client_mean("agreement-real"),
        "start-acc": client_mean("start-acc"),
        "received-acc": client_mean("received-acc"),
        "after-acc": client_mean("after-acc"),
        "retention": client_mean("retention"),
    }
    stages["retention-vs-all-client-ensemble"] = (
        retention(stages["received-acc"], all_acc) if stages["received-acc"] is not None
        else None)
    return stages


def knowledge_markdown(report: dict[str, Any]) -> str:
    """The stage table of :func:`knowledge_report` (accuracies in %)."""
    s = report["stages"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    lines = ["## Knowledge flow (official test split, client-weighted means)", "",
             "| stage | value |", "|---|---|",
             f"| teacher ceiling: ensemble of all uploads | {pct(s['all-client-ensemble-acc'])} |",
             f"| teacher each received model was distilled from | {pct(s['teacher-acc'])} |",
             f"| student-teacher agreement, final synthetic images | "
             f"{pct(s['agreement-synthetic'])} |",
             f"| student-teacher agreement, real test images | {pct(s['agreement-real'])} |",
             *([f"| student's start (weighted average of its teachers' uploads) | "
                f"{pct(s['start-acc'])} |"] if s.get("start-acc") is not None else []),
             f"| received model (before personalization) | {pct(s['received-acc'])} |",
             f"| after personalization | {pct(s['after-acc'])} |",
             f"| retention (received / its teacher) | "
             f"{'n/a' if s['retention'] is None else format(s['retention'], '.3f')} |",
             f"| retention vs the all-client ensemble | "
             f"{'n/a' if s['retention-vs-all-client-ensemble'] is None else format(s['retention-vs-all-client-ensemble'], '.3f')} |"]
    return "\n".join(lines) + "\n"


def write_knowledge(run_dir: Path, cfg: Any, uploads: Sequence[Any], out: Any,
                    rows: Sequence[dict], in_channels: int, num_classes: int,
                    device: torch.device) -> dict[str, Any] | None:
    """Write ``knowledge.json`` for a distilling method's run (None for the other methods).

    The official test split is public data the server can read in simulation; where it cannot
    (a deployment on the sites' own archives), the file says why the flow is not measured.
    """
    from fedbicross_flwr.data.datasets import DataError, load_dataset
    from fedbicross_flwr.data.site import to_tensors
    from fedbicross_flwr.storage.atomic import write_json

    if cfg.method not in method_names(distils=True):
        return None
    try:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                          cfg.in_channels, cfg.num_classes)
    except DataError as err:
        report: dict[str, Any] = {"method": cfg.method, "available": False,
                                  "reason": f"the server cannot read the official test split: "
                                            f"{err}"}
        write_json(run_dir / "knowledge.json", report)
        return report
    synthetic_path = run_dir / "synthetic.pt"
    synthetic = (torch.load(synthetic_path, map_location="cpu", weights_only=True)
                 if synthetic_path.is_file() else None)
    weights = out.diagnostics.get("final-weights") if cfg.method == "fedbicross" else None
    report = knowledge_report(cfg.method, cfg.ensemble, uploads, out.models, out.clusters,
                              weights, rows, to_tensors(ds.test.images, ds.test.labels),
                              in_channels, num_classes, device, cfg.eval_precision, synthetic,
                              cfg.student_init)
    write_json(run_dir / "knowledge.json", report)
    s = report["stages"]
    log(logging.INFO, "knowledge flow (official test): all-client ensemble %.4f, teacher %.4f, "
        "received %.4f, after %.4f, retention %.3f", s["all-client-ensemble-acc"],
        s["teacher-acc"] or float("nan"), s["received-acc"] or float("nan"),
        s["after-acc"] if s["after-acc"] is not None else float("nan"),
        s["retention"] if s["retention"] is not None else float("nan"))
    return report
