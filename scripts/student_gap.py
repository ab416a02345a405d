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

from cached_clients import load_cached_clients
from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer
from fedbicross_flwr.fedbicross.method import run_fedbicross
from fedbicross_flwr.methods.fedbicross import settings_from_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, required=True)
    parser.add_argument("--client-cache", type=Path, required=True)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    clients = load_cached_clients(args.preset, args.client_cache, args.run_config)
    cfg, ds, replies = clients.cfg, clients.dataset, clients.replies
    pids = sorted(replies)
    models = [clients.model(pid) for pid in pids]

    def report(trainer: OnlineBilevelTrainer, label: str) -> None:
        accs = [clients.accuracy(s) for s in trainer.students]
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
