"""``fedbicross bench``: arguments and entry point (torch is imported only when it runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedbicross_flwr.storage.atomic import write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedbicross bench`` (defaults: the issue's N=5, K=2, B=64 on CPU)."""
    parser.add_argument("--clients", type=int, default=5, help="N client models")
    parser.add_argument("--clusters", type=int, default=2, help="K clusters (round-robin)")
    parser.add_argument("--batch", type=int, default=64, help="B synthetic images per cluster")
    parser.add_argument("--steps", type=int, default=4, help="T trajectory steps of the real run")
    parser.add_argument("--ref-steps", type=int, default=2,
                        help="timed steps of the reference-style path (median)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="real path precision (the reference is always float32)")
    parser.add_argument("--model", choices=("resnet18", "tiny"), default="resnet18")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--width", type=int, default=64,
                        help="ResNet-18 base width w in [4, 128] (run-config model-width; "
                             "paper: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="device peak for the FLOP/s ratio (0: estimate)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the members inside synthesis (run-config compile)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the reference path (no comparison, no speed-up)")
    parser.add_argument("--json", default="", help="also write the report to this JSON file")
    parser.add_argument("--scaling", default="",
                        help="instead: sweep one of clients|clusters|batch over the "
                             "comma-separated values after '=', e.g. clients=5,10,20")
    parser.add_argument("--plot", default="", help="with --scaling: save a PNG plot here")


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark (or a scaling sweep) and print the report; 1 if a check failed."""
    import torch

    from .server_stage import BenchConfig, format_report, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = BenchConfig(num_clients=args.clients, num_clusters=args.clusters, batch=args.batch,
                          steps=args.steps, ref_steps=args.ref_steps, device=args.device,
                          dtype=args.dtype, model=args.model, in_channels=args.in_channels,
                          num_classes=args.num_classes, image_size=args.image_size,
                          width=args.width, seed=args.seed, peak_tflops=args.peak_tflops, check=not args.no_check,
                          compile=args.compile)
    except ValueError as err:
        print(f"configuration error: bench: {err}", file=sys.stderr)
        return 2
    if args.scaling:
        from .scaling import format_sweep, parse_sweep, run_sweep

        axis, values = parse_sweep(args.scaling)
        rows = run_sweep(cfg, axis, values)
        print(format_sweep(rows, axis))
        if args.json:
            write_text(Path(args.json), json.dumps(rows, indent=1))
        if args.plot:
            from .scaling import plot_sweep

            plot_sweep(rows, axis, Path(args.plot))
            print(f"plot: {args.plot}")
        return 0
    report = run_benchmark(cfg)
    print(format_report(report))
    if args.json:
        write_text(Path(args.json), json.dumps(report, indent=1, default=str))
    return 0 if report.get("checks_passed", True) else 1
