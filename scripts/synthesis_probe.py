"""Diagnostic: does KD on a cluster's synthetic trajectory help or hurt its average model?

For each value of one synthesis setting (e.g. ``bn-weight``), synthesize ONE cluster's
trajectory from cached client models, distil the cluster's data-size weighted average model on
it for T plain KD steps (Eq. 5 with lambda = 0: the original teachers only; SGD with the
preset's student lr and momentum, train-mode BN as in the real path), and print the model's
official-test accuracy before and after (with the running BN statistics the KD steps left, and
with the average's own statistics put back), with the teachers' agreement and the last R_BN.
Test accuracy is only printed, never used by the method: a tool for choosing budgets by hand.

    python scripts/synthesis_probe.py --preset conf/cpu.toml --client-cache outputs/.client-cache \
        --run-config "dataset='digits' seed=1" --cluster 0,2,3,4 --key bn-weight --values 0.01,0.1,1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch

from cached_clients import load_cached_clients
from fedbicross_flwr.config import RunConfig, parse_overrides
from fedbicross_flwr.fedbicross.losses import kd_kl
from fedbicross_flwr.fedbicross.noise_adapt import teacher_soft_labels
from fedbicross_flwr.fedbicross.synthesis import EnsembleTeacher, synthesize_trajectory
from fedbicross_flwr.methods.fedbicross import settings_from_config
from fedbicross_flwr.model import build_resnet18, weighted_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, required=True)
    parser.add_argument("--client-cache", type=Path, required=True)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--cluster", required=True, help="comma-separated partition ids")
    parser.add_argument("--key", default="bn-weight", help="run-config key to vary")
    parser.add_argument("--values", required=True, help="comma-separated values of --key")
    args = parser.parse_args()
    clients = load_cached_clients(args.preset, args.client_cache, args.run_config)
    base, ds, replies = clients.values, clients.dataset, clients.replies
    pids = [int(p) for p in args.cluster.split(",")]
    members = [clients.model(pid).eval() for pid in pids]
    average = build_resnet18(ds.in_channels, ds.num_classes)
    average.load_state_dict(weighted_average([replies[p].state for p in pids],
                                             [replies[p].metrics["num-examples"] for p in pids]))
    print(f"cluster {pids}: average model {clients.accuracy(average):.2f} % official test; "
          f"members {[round(clients.accuracy(m), 2) for m in members]}", flush=True)
    syntheses: dict[str, tuple] = {}  # keys that only change the KD steps reuse the trajectory
    soft_labels: dict[str, torch.Tensor] = {}  # ... and the teachers' soft labels on it
    for raw in args.values.split(","):
        value = parse_overrides(f"{args.key}={raw}")[args.key]
        settings = settings_from_config(RunConfig.from_run_config({**base, args.key: value}))
        start = time.perf_counter()
        synthesis_key = repr(dataclasses.replace(settings, student_lr=1.0, student_momentum=0.0))
        if synthesis_key not in syntheses:
            syntheses[synthesis_key] = synthesize_trajectory(
                members, ds.num_classes, ds.in_channels, settings, settings.seed, "cpu",
                progress=False)
        trajectory, _, diag = syntheses[synthesis_key]
        labels_key = f"{synthesis_key} tau={settings.tau}"  # frozen teachers: label once
        if labels_key not in soft_labels:
            soft_labels[labels_key] = teacher_soft_labels(
                EnsembleTeacher(members, settings.ensemble, "eval"), trajectory, settings.tau,
                settings.label_chunk, settings.mixed_precision)
        probs = soft_labels[labels_key]
        student = copy.deepcopy(average).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=settings.student_lr,
                                    momentum=settings.student_momentum)
        for t in range(trajectory.shape[0]):  # (B, C_in, H, W) per step, as the online stage
            loss = kd_kl(student(trajectory[t].float()), probs[t], settings.tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        after = clients.accuracy(student)
        with torch.no_grad():  # the same weights with the average's (real-data) BN statistics
            for (name, buf), ref in zip(student.named_buffers(), average.buffers()):
                if "running_" in name:
                    buf.copy_(ref)
        kept = clients.accuracy(student)
        print(f"{args.key}={value}: teachers agree {100 * diag['teacher_accuracy']:.1f} %, "
              f"last CE {diag['ce'][-1]:.3f} R_BN {diag['bn'][-1]:.1f}; after {trajectory.shape[0]} "
              f"KD steps the average model scores {after:.2f} % with the BN statistics KD left, "
              f"{kept:.2f} % with the average's own ({time.perf_counter() - start:.0f} s)",
              flush=True)
        for m in members:
            m.eval()


if __name__ == "__main__":
    main()
