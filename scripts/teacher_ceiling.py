"""What the client models know, on the official test split: the ceiling for any KD method.

Loads the phase-1 client models from the client cache (run the preset once with
``--client-cache`` first) and prints, on the official test split: each client model, the
FedAvg-1 average, and ensembles of the client models (mean of softmax probabilities, as the
FedBiCross teachers with ensemble='prob') for all clients and for the given clusters.

    python scripts/teacher_ceiling.py --preset conf/cpu.toml --client-cache outputs/.client-cache \
        --run-config "dataset='digits'" --clusters 0,1,4/2,3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedbicross_flwr import client_cache
from fedbicross_flwr.config import RunConfig, load_preset, parse_overrides
from fedbicross_flwr.data import load_dataset
from fedbicross_flwr.model import build_resnet18, weighted_average
from fedbicross_flwr.site import to_tensors
from fedbicross_flwr.training import predict_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, required=True)
    parser.add_argument("--client-cache", type=Path, required=True)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--clusters", default="", help="e.g. 0,1,4/2,3")
    args = parser.parse_args()
    cfg = RunConfig.from_run_config({**load_preset(args.preset), **parse_overrides(args.run_config)})
    cached = client_cache.load(args.client_cache, cfg)
    if cached is None:
        raise SystemExit("no valid client-cache entry for this config: run the preset once first")
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download)
    x, y = to_tensors(ds.test.images, ds.test.labels)
    in_ch, n_cls = x.shape[1], int(ds.num_classes)
    replies = cached["phase1"].replies
    pids = sorted(replies)
    probs, sizes = {}, {}
    for pid in pids:
        model = build_resnet18(in_ch, n_cls)
        model.load_state_dict(replies[pid].state)
        probs[pid] = predict_logits(model, x, torch.device("cpu")).softmax(dim=1)
        sizes[pid] = replies[pid].metrics["num-examples"]

    def acc(p: torch.Tensor) -> float:
        return 100.0 * (p.argmax(1) == y).float().mean().item()

    print(f"official test: {len(y)} images, majority-class rate {100 * ds.majority_rate('test'):.2f}%")
    for pid in pids:
        print(f"client {pid} (n={sizes[pid]:.0f}): {acc(probs[pid]):.2f}%")
    avg = build_resnet18(in_ch, n_cls)
    avg.load_state_dict(weighted_average([replies[p].state for p in pids], [sizes[p] for p in pids]))
    print(f"FedAvg-1 average model: {acc(predict_logits(avg, x, torch.device('cpu')).softmax(1)):.2f}%")
    print(f"ensemble of all clients: {acc(torch.stack([probs[p] for p in pids]).mean(0)):.2f}%")
    for group in filter(None, args.clusters.split("/")):
        members = [int(v) for v in group.split(",")]
        print(f"ensemble of clients {members}: {acc(torch.stack([probs[p] for p in members]).mean(0)):.2f}%")


if __name__ == "__main__":
    main()
