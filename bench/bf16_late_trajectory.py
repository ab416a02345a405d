"""bf16 vs float32 image gradient of L_DI early and late in a synthesis trajectory.

    .venv/bin/python bench/bf16_late_trajectory.py            # T=200, cluster of 2 members
    PYTHONPATH=<checkout of another commit> .venv/bin/python bench/bf16_late_trajectory.py eval

Synthesises one cluster (the benchmark's clients 1 and 3, N=5 K=2, B=64) for T steps in bf16,
stores x^(8) and x^(T) with the float32 reference image gradient (``reference.py``) in
/tmp/bf16_late_trajectory.pt, then prints the relative error of the real path's image gradient
(eager bf16, float32, compiled bf16) on both. With ``eval`` it only evaluates the stored images
(e.g. with an older checkout on PYTHONPATH, to compare versions on the same inputs).
Quoted in docs/BENCHMARKS.md (sixth session, T=200).
"""
import dataclasses
import os
import sys

import torch

from fedbicross_flwr.benchmark.server_stage import (BenchConfig, _fp32_copies, _real_synthesis_grad,
                                                    _ref_synthesis_grad, _settings, make_clients,
                                                    rel_err)
from fedbicross_flwr.fedbicross.synthesis import initial_state, synthesize_trajectory
from fedbicross_flwr.fedbicross.utils import derive_seed, to_channels_last

STORE = "/tmp/bf16_late_trajectory.pt"
cfg = BenchConfig(num_clients=5, num_clusters=2, batch=64, steps=int(os.environ.get("T", "200")))
device = torch.device("cpu")
members = [c for i, c in enumerate(make_clients(cfg, device)) if i % 2 == 1]
bf16, fp32 = _settings(cfg), _settings(cfg, "fp32")
to_channels_last(members)  # as synthesis leaves them, in both modes
if sys.argv[1:] != ["eval"]:
    seed = derive_seed(cfg.seed, 3, 0, 1)
    trajectory, labels, _ = synthesize_trajectory(members, 10, 1, bf16, seed,
                                                  device, progress=False)
    offset = initial_state(10, 1, bf16, cfg.seed, 28)[2][0]
    stored = {"labels": labels, "offset": offset, "images": {}}
    for step in (8, cfg.steps):
        x = trajectory[step - 1].float()
        _, ref_grad = _ref_synthesis_grad(_fp32_copies(members, True), x, labels, offset, fp32)
        stored["images"][step] = (x, ref_grad)
    torch.save(stored, STORE)
stored = torch.load(STORE)
variants = [("eager bf16", bf16), ("float32", fp32)]
if hasattr(bf16, "compile"):
    variants.append(("compiled bf16", dataclasses.replace(bf16, compile=True)))
for step, (x, ref_grad) in stored["images"].items():
    for name, settings in variants:
        _, grad = _real_synthesis_grad(members, x, stored["labels"], stored["offset"], settings)
        print(f"x^({step}): {name} image gradient vs float32 reference: relative error "
              f"{rel_err(grad, ref_grad):.3f}", flush=True)
