"""Diagnostic: how far the cluster models G_k get towards their teachers with more KD passes.

Runs the FedBiCross server stage on the cached phase-1 client models of a preset, but replays
each server epoch's bi-level stage ``--passes`` times over the same trajectory, and after each
pass prints every G_k's accuracy on the official test split. Test accuracy is only printed
(a diagnostic for choosing budgets by hand), never used by the method.

    python scripts/student_gap.py --preset conf/cpu.toml --client-cache outputs/.client-cache \
        --run-config "dataset='digits' student-init='cluster-average'" --passes 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fedbicross_flwr import client_cache
from fedbicross_flwr.config import RunConfig, load_preset, parse_overrides
from fedbicross_flwr.data import load_dataset
from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer
from fedbicross_flwr.fedbicross.method import run_fedbicross
from fedbicross_flwr.methods.fedbicross import settings_from_config
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.site import to_tensors
from fedbicross_flwr.training import predict_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, required=True)
    parser.add_argument("--client-cache", type=Path, required=True)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    cfg = RunConfig.from_run_config({**load_preset(args.preset), **parse_overrides(args.run_config)})
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    cached = client_cache.load(args.client_cache, cfg)
    if cached is None:
        raise SystemExit("no valid client-cache entry for this config: run the preset once first")
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download)
    x, y = to_tensors(ds.test.images, ds.test.labels)
    replies = cached["phase1"].replies
    pids = sorted(replies)
    models = []
    for pid in pids:
        model = build_resnet18(ds.in_channels, ds.num_classes)
        model.load_state_dict(replies[pid].state)
        models.append(model)

    def report(trainer: OnlineBilevelTrainer, label: str) -> None:
        accs = [100.0 * (predict_logits(s, x, torch.device("cpu")).argmax(1) == y).float().mean().item()
                for s in trainer.students]
        for s in trainer.students:
            s.train()
        print(f"{label}: G_k official-test accuracy {np.round(accs, 2).tolist()}, "
              f"weights {np.round(trainer.weights.cpu().numpy(), 3).tolist()}", flush=True)

    original = OnlineBilevelTrainer.run_epoch

    def replayed(self, trajectories, teacher_probs, noise_probs, progress=True, tag=""):
        report(self, f"{tag} before KD")
        histories = []
        for p in range(args.passes):
            start = time.perf_counter()
            histories.append(original(self, trajectories, teacher_probs, noise_probs,
                                      progress=False, tag=tag))
            report(self, f"{tag} after pass {p + 1}/{args.passes} ({time.perf_counter() - start:.0f} s)")
        return {key: np.concatenate([h[key] for h in histories]) for key in histories[0]}

    OnlineBilevelTrainer.run_epoch = replayed
    run_fedbicross(models, ds.in_channels, ds.num_classes, settings_from_config(cfg),
                   torch.device("cpu"), progress=False,
                   client_weights=[replies[p].metrics["num-examples"] for p in pids])


if __name__ == "__main__":
    main()
