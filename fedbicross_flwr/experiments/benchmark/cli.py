"""``fedbicross bench``: arguments and entry point (torch is imported only when it runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedbicross_flwr.storage.atomic import write_text

if TYPE_CHECKING:
    from .device_report import DeviceReportConfig
    from .server_stage import BenchConfig


# Sizes whose default depends on the mode: (plain bench, --device-check, --device-check --tiny).
_MODE_DEFAULTS = {"clients": (5, 5, 3), "batch": (64, 256, 8), "steps": (4, 500, 2),
                  "image_size": (28, 28, 8), "widths": ("", "16,32,64", "4,8")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedbicross bench`` (defaults: the issue's N=5, K=2, B=64 on CPU)."""
    parser.add_argument("--clients", type=int, default=None,
                        help="N client models (default 5; 3 with --tiny)")
    parser.add_argument("--clusters", type=int, default=2, help="K clusters (round-robin)")
    parser.add_argument("--batch", type=int, default=None,
                        help="B synthetic images per cluster (default 64; --device-check: "
                             "256, the paper's; 8 with --tiny)")
    parser.add_argument("--steps", type=int, default=None,
                        help="T trajectory steps of the real run (default 4; --device-check: "
                             "500, the paper's; 2 with --tiny)")
    parser.add_argument("--ref-steps", type=int, default=2,
                        help="timed steps of the reference-style path (median)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="real path precision (the reference is always float32; default "
                             "bf16; --device-check: bf16 where the device has it natively, "
                             "else fp32)")
    parser.add_argument("--model", choices=("resnet18", "tiny"), default="resnet18")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=None, help="default 28; 8 with --tiny")
    parser.add_argument("--width", type=int, default=64,
                        help="ResNet-18 base width w in [4, 128] (run-config model-width; "
                             "paper: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="device peak for the FLOP/s ratio (0: estimate)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the members inside synthesis (run-config compile)")
    parser.add_argument("--compile-scope", choices=("synthesis", "all"), default="synthesis",
                        help="with --compile: synthesis only, or every per-step loop "
                             "(run-config compile-scope)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the reference path (no comparison, no speed-up)")
    parser.add_argument("--json", default="", help="also write the report to this JSON file")
    parser.add_argument("--scaling", default="",
                        help="instead: sweep one of clients|clusters|batch over the "
                             "comma-separated values after '=', e.g. clients=5,10,20")
    parser.add_argument("--plot", default="", help="with --scaling: save a PNG plot here")
    device = parser.add_argument_group(
        "device check (--device-check): the device against the CPU on a tiny run, its measured "
        "peak, and one server epoch per width at the paper's T and B (docs/BENCHMARKS.md)")
    device.add_argument("--device-check", action="store_true",
                        help="run the device check, peak and per-width epochs instead")
    device.add_argument("--widths", default=None,
                        help="comma-separated ResNet-18 widths (default 16,32,64; 4,8 with "
                             "--tiny)")
    device.add_argument("--budget-s", type=float, default=480.0,
                        help="skip a width whose estimated epoch does not fit in what is left "
                             "of this many seconds (0: no limit)")
    device.add_argument("--tiny", action="store_true",
                        help="seconds-scale sizes for CI (N=3, T=2, B=8, 8x8 images, widths "
                             "4,8, tiny peak operands)")
    device.add_argument("--csv", default="", help="write the per-width rows to this CSV file")


def _mode_defaults(args: argparse.Namespace) -> None:
    """Fill the sizes left unset with the defaults of the mode (plain, device check, tiny)."""
    mode = 2 if args.device_check and args.tiny else int(bool(args.device_check))
    for name, values in _MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[mode])
    if args.dtype is None:
        args.dtype = "bf16"
        if args.device_check:
            from ...training import resolve_device, uses_bf16

            args.dtype = "bf16" if uses_bf16(resolve_device(args.device), "auto") else "fp32"


def _config(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of the arguments (raises ValueError naming a bad one)."""
    from .server_stage import BenchConfig

    if args.tiny and not args.device_check:
        raise ValueError("--tiny needs --device-check")
    if args.device_check and args.scaling:
        raise ValueError("--device-check and --scaling are two modes: give one")
    _mode_defaults(args)
    return BenchConfig(num_clients=args.clients, num_clusters=args.clusters, batch=args.batch,
                       steps=args.steps, ref_steps=args.ref_steps, device=args.device,
                       dtype=args.dtype, model="resnet18" if args.device_check else args.model,
                       in_channels=args.in_channels, num_classes=args.num_classes,
                       image_size=args.image_size, width=args.width, seed=args.seed,
                       peak_tflops=args.peak_tflops,
                       check=not (args.no_check or args.device_check), compile=args.compile,
                       compile_scope=args.compile_scope)


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark (or a scaling sweep, or the device check) and print the report; 1 if
    a check failed.
    """
    import torch

    from .server_stage import format_report, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = _config(args)
        if args.device_check:
            device_cfg = _device_config(args, cfg)
    except ValueError as err:
        print(f"configuration error: bench: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if args.device_check:
        return _device_command(args, device_cfg)
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


def _device_config(args: argparse.Namespace, cfg: BenchConfig) -> DeviceReportConfig:
    """The :class:`~.device_report.DeviceReportConfig` of the arguments."""
    from .device_check import TINY_CHECK, CheckSizes
    from .device_report import DeviceReportConfig

    try:
        widths = tuple(int(w) for w in args.widths.split(",") if w.strip())
    except ValueError:
        raise ValueError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    check = TINY_CHECK if args.tiny else CheckSizes(clients=cfg.num_clients,
                                                    clusters=cfg.num_clusters,
                                                    in_channels=cfg.in_channels,
                                                    num_classes=cfg.num_classes,
                                                    image_size=cfg.image_size)
    return DeviceReportConfig(cfg, widths=widths, budget_s=args.budget_s, check=check,
                              tiny=args.tiny)


def _device_command(args: argparse.Namespace, cfg: DeviceReportConfig) -> int:
    """``--device-check``: run, print the tables, write the JSON and CSV; 1 if the check failed."""
    from .device_report import format_epochs, run_device_report, write_csv

    report = run_device_report(cfg)
    print(format_epochs(report))
    if args.json:
        write_text(Path(args.json), json.dumps(report, indent=1, default=str))
        print(f"report: {args.json}")
    if args.csv:
        write_csv(report["epochs"], Path(args.csv))
        print(f"rows: {args.csv}")
    return 0 if report["passed"] else 1
