"""FedBiCross as a server method: Stages 1-2 on the server, Stage 3 by ``train.personalize``.

The algorithm lives in :mod:`fedbicross_flwr.fedbicross` (plain PyTorch). This adapter takes
its settings from the run config (``FedBiCrossSettings.of(cfg)``,
:mod:`fedbicross_flwr.fedbicross.config`), sends each client its cluster model G_k, and writes the method's
artefacts into the run folder:

``clusters.csv``                 partition-id -> cluster
``weights.csv`` / ``weights.png`` cross-cluster weight history (one row per bi-level step)
``synthetic.png``                final synthetic images per cluster (like the paper's Fig. 3)
``fedbicross.json``              diagnostics: stage wall times, synthesis losses, teacher accuracy
"""

from __future__ import annotations

import logging

import numpy as np

from fedbicross_flwr.distill.plots import save_synthetic_grid
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross
from fedbicross_flwr.fedbicross.plots import plot_weight_history, save_weight_history_csv
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput, write_clusters_csv
from fedbicross_flwr.model import load_resnet18
from fedbicross_flwr.storage.atomic import write_json


def fedbicross(inp: MethodInput) -> MethodOutput:
    """Cluster, synthesize, learn cross-cluster weights; each client gets its G_k."""
    cfg = inp.cfg
    asked = FedBiCrossSettings.of(cfg).num_clusters
    k = min(asked, len(inp.uploads))
    if k < asked:
        log(logging.WARNING, "only %d client models for num-clusters=%d: using K=%d",
            len(inp.uploads), asked, k)
    settings = FedBiCrossSettings.of(cfg, num_clusters=k)
    models = [load_resnet18(upload.state) for upload in inp.uploads]
    result = run_fedbicross(models, inp.in_channels, inp.num_classes, settings, inp.device,
                            progress=cfg.progress,
                            client_weights=[u.num_examples for u in inp.uploads],
                            checkpoint_dir=inp.run_dir / "checkpoints")
    pids = [u.partition_id for u in inp.uploads]
    clusters = {pid: int(c) for pid, c in zip(pids, result.assignment)}

    # Artefacts -------------------------------------------------------------------------------
    write_clusters_csv(inp.run_dir, clusters)
    save_weight_history_csv(result.weight_history, inp.run_dir / "weights.csv")
    plot_weight_history(result.weight_history, inp.run_dir / "weights.png",
                        steps_per_epoch=settings.synth_steps * settings.kd_passes)
    if result.synthetic_examples:
        save_synthetic_grid(result.synthetic_examples, inp.run_dir / "synthetic.png",
                            labels_per_cluster=result.synthetic_labels)
    write_json(inp.run_dir / "fedbicross.json", result.diagnostics)
    final = np.asarray(result.weight_history[-1]).round(4).tolist()
    log(logging.INFO, "fedbicross: clusters %s, final cross-cluster weights %s", clusters, final)
    return MethodOutput(
        models={pid: result.cluster_models[c] for pid, c in clusters.items()},
        clusters=clusters,
        diagnostics={"clusters": clusters, "final-weights": final,
                     "stage-times-s": result.diagnostics.get("stage_times_s"),
                     "synthesis-summary": _synthesis_summary(result.diagnostics)},
    )


def _synthesis_summary(diag: dict) -> list[dict]:
    """Per cluster of the last server epoch: teacher accuracy on targets, entropy, final losses."""
    out = []
    for k, d in enumerate((diag.get("synthesis") or [[]])[-1]):
        out.append({"cluster": k, "teacher-accuracy": d.get("teacher_accuracy"),
                    "chance-accuracy": d.get("chance_accuracy"),
                    "teacher-entropy": d.get("teacher_entropy"),
                    "max-entropy": d.get("max_entropy"),
                    "final-ce": (d.get("ce") or [None])[-1],
                    "final-bn": (d.get("bn") or [None])[-1],
                    "final-tv": (d.get("tv") or [None])[-1],
                    "soft-label-profile": d.get("soft_label_profile"),
                    "wall-time-s": d.get("wall_time_s")})
    return out
