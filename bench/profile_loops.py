"""Where the time of the fp32 bi-level step and of phase 3 goes, by operator (torch.profiler).

    python bench/profile_loops.py bilevel [--width 16] [--batch 64] [--steps 5] [--threads 2]
    python bench/profile_loops.py phase3 [--threads 2]

``bilevel``: the bi-level KD step (Eq. 7-8) of N = 5 clients in K = 2 clusters on BloodMNIST's
shapes (3 x 28 x 28, 8 classes), after one warm-up step, per trajectory step.
``phase3``: one client's personalization round as the ClientApp runs it
(``run_personalization``: evaluation before, Eq. 9 for ``pers-epochs``, evaluation after), at
conf/quickstart.toml's values on digits, client 0, after one warm-up round.

Prints the wall time and the share of the profiled CPU time per operator group (convolution
forward and backward, batch norm, ...), then the largest remaining operators. Run it on an idle
machine: BENCHMARKS.md ("Inside the bi-level step and phase 3") has the numbers.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

GROUPS = (  # (group, substrings of the lower-cased operator name), first match wins
    ("convolution (forward and backward)", ("convolution", "conv2d", "mkldnn_conv")),
    ("batch norm (forward and backward)", ("batch_norm", "batchnorm")),
    ("relu (forward and backward)", ("relu", "threshold", "clamp_min")),
    ("copies and layout", ("copy_", "to_copy", "contiguous", "clone")),
    ("optimizer", ("foreach", "sgd", "_fused")),
    ("losses and softmax", ("softmax", "kl_div", "nll", "cross_entropy")),
    ("pooling and linear", ("pool", "addmm", "linear", "aten::mm")),
)


def group_of(name: str) -> str | None:
    """The group an operator belongs to, or None."""
    lowered = name.lower()
    for group, parts in GROUPS:
        if any(p in lowered for p in parts):
            return group
    return None


def print_shares(prof: profile, wall_s: float, label: str) -> dict[str, float]:
    """Print and return each group's share (%) of the profiled self CPU time."""
    shares: dict[str, float] = defaultdict(float)
    rest: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        group = group_of(event.key)
        (shares if group else rest)[group or event.key] += event.self_cpu_time_total
    total = sum(shares.values()) + sum(rest.values())
    print(f"{label}: wall {wall_s:.3f} s; profiled self CPU time {total / 1e6:.2f} s")
    out = {g: 100 * v / total for g, v in shares.items()}
    for group, share in sorted(out.items(), key=lambda kv: -kv[1]):
        print(f"  {group:40s} {share:5.1f} %")
    out["other"] = 100 * sum(rest.values()) / total
    print(f"  {'other operators':40s} {out['other']:5.1f} %, the largest:")
    for name, v in sorted(rest.items(), key=lambda kv: -kv[1])[:6]:
        print(f"    {name:60s} {100 * v / total:5.1f} %")
    return out


def profile_bilevel(width: int, batch: int, steps: int) -> dict[str, float]:
    """Profile ``steps`` bi-level steps (N = 5, K = 2) after one warm-up step."""
    from fedbicross_flwr.distill.synthesis import synthesize_trajectory
    from fedbicross_flwr.experiments.benchmark.server_stage import (
        BenchConfig,
        _settings,
        _student_factory,
        make_clients,
    )
    from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer, fixed_weights
    from fedbicross_flwr.fedbicross.method import init_cluster_models

    cpu = torch.device("cpu")
    cfg = BenchConfig(num_clients=5, num_clusters=2, batch=batch, steps=steps + 1, width=width,
                      dtype="fp32", in_channels=3, num_classes=8, device="cpu")
    settings = _settings(cfg)
    clients = make_clients(cfg, cpu)
    images, teacher_probs, noise_probs = [], [], []
    for k in range(2):
        members = [c for i, c in enumerate(clients) if i % 2 == k]
        trajectory, _, _ = synthesize_trajectory(members, 8, 3, settings, k, cpu,
                                                 image_size=28, progress=False)
        images.append(trajectory)
        teacher_probs.append(torch.softmax(torch.randn(*trajectory.shape[:2], 8), -1))
        noise_probs.append(torch.softmax(torch.randn(*trajectory.shape[:2], 8), -1))
    students = init_cluster_models(_student_factory(cfg), 2, 0, cpu)
    trainer = OnlineBilevelTrainer(students, settings, fixed_weights("bilevel", 2), cpu)
    train_idx, val_idx = trainer.split(batch)

    def step(t: int) -> None:
        trainer.step(t + 1, steps + 1, [x[t] for x in images], [p[t] for p in teacher_probs],
                     [p[t] for p in noise_probs], train_idx, val_idx)

    step(0)  # warm-up: allocator, kernel selection
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for t in range(1, steps + 1):
            step(t)
        wall = (time.perf_counter() - start) / steps
    return print_shares(prof, wall, f"bi-level step (N 5, K 2, B {batch}, width {width}), "
                        "per trajectory step")


def profile_phase3() -> dict[str, float]:
    """Profile one client's personalization round at conf/quickstart.toml's values."""
    from fedbicross_flwr.client import run_personalization
    from fedbicross_flwr.config.run_config import RunConfig, load_preset
    from fedbicross_flwr.data.datasets import load_dataset
    from fedbicross_flwr.data.site import site_from_partition
    from fedbicross_flwr.model import build_resnet18, initial_state

    preset = load_preset(Path(__file__).resolve().parents[1] / "conf" / "quickstart.toml")
    cfg = RunConfig.from_run_config({**preset, "methods": "", "progress": False})
    ds = load_dataset("digits")
    site = site_from_partition(ds, cfg, 0, cfg.num_clients)
    own = build_resnet18(ds.in_channels, ds.num_classes, cfg.model_width)
    received = build_resnet18(ds.in_channels, ds.num_classes, cfg.model_width)
    received.load_state_dict(initial_state(cfg, ds.in_channels, ds.num_classes))
    cpu = torch.device("cpu")
    run_personalization(cfg, site, own, received, cpu)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_personalization(cfg, site, own, received, cpu)
        wall = time.perf_counter() - start
    return print_shares(prof, wall, f"phase 3 of client 0 ({site.n_train} training images, "
                        f"{cfg.pers_epochs} epochs, width {cfg.model_width})")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the arguments, profile the chosen loop, return its shares (%)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loop", choices=("bilevel", "phase3"))
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.width, args.batch, args.steps, args.threads) < 1:
        parser.error("--width, --batch, --steps and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    if args.loop == "bilevel":
        return profile_bilevel(args.width, args.batch, args.steps)
    return profile_phase3()


if __name__ == "__main__":
    main()
