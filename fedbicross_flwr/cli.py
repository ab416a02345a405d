"""Command line: run a whole experiment in one process (no Ray), or print the config table.

Examples
--------
fedbicross run --preset conf/cpu.toml --run-config "dataset='digits' method='fedbicross'"
fedbicross run --engine apps --run-config "local-epochs=2"      # through the real apps
fedbicross config-table [--write]                                 # README's key table
fedbicross bench --clients 5 --clusters 2 --batch 64 --steps 4    # server-stage benchmark
fedbicross bench --device-check --device cuda                     # GPU check, peak, epochs
fedbicross grid --preset conf/grid-cpu.toml                       # experiment grid + tables
fedbicross distill-check --dataset digits --synthesis fedbicross  # one-teacher retention
fedbicross privacy-audit outputs/RUN --client-cache CACHE         # what a run reveals

A bad input (configuration, data archive, output folder, preset) is reported as ONE line on
stderr with a non-zero exit (2 for a configuration error, 1 otherwise), before any training;
``--debug`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path

from fedbicross_flwr.config.run_config import (
    ConfigError,
    RunConfig,
    load_preset,
    markdown_table,
    parse_overrides,
)
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.storage.atomic import write_text


def build_config(preset: str | None, overrides: str, pyproject: Path | None = None
                 ) -> tuple[RunConfig, dict]:
    """Defaults of pyproject.toml (if found) < preset < overrides, validated."""
    values: dict = {}
    if pyproject is not None and pyproject.is_file():
        with pyproject.open("rb") as fh:
            values.update(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    if preset:
        values.update(load_preset(preset))
    values.update(parse_overrides(overrides))
    return RunConfig.from_run_config(values), values


def preflight(cfg: RunConfig, partitions: bool = True) -> None:
    """Check what a run needs before any work starts: the output folder can be created and
    written, the device exists, the dataset the server would read loads and matches the
    config, and (``partitions``: the commands that federate it) its training split can be
    partitioned among the clients.

    Raises
    ------
    ConfigError
        The output folder is not a directory or cannot be written, the device is absent, a
        multi-round method's ``strategy-args`` do not fit its Flower strategy, or
        ``dataset='custom'`` has no ``data-path`` (these commands have no sites that bring
        their own archives).
    DataError
        The dataset is unknown, missing, corrupt or inconsistent with the config.
    PartitionError
        The dataset's training split cannot be partitioned among ``num-clients`` clients.
    """
    from fedbicross_flwr.config.run_config import check_strategy_args
    from fedbicross_flwr.data.datasets import load_dataset
    from fedbicross_flwr.data.partition import make_client_splits
    from fedbicross_flwr.reports.results import default_output_dir
    from fedbicross_flwr.training import resolve_device

    base = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    if base.exists() and not base.is_dir():
        raise ConfigError(f"output-dir {base} is not a directory")
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise ConfigError(f"output-dir {base} cannot be created or written: "
                          f"{err.strerror or err}") from err
    resolve_device(cfg.device)
    check_strategy_args(cfg)  # every multi-round method's strategy-args, before any training
    if cfg.sites_bring_data:  # only a deployment's sites bring their own archives
        raise ConfigError("dataset='custom' but data-path is not set: give the npz archive "
                          "to read (in a deployment, each site sets data-path in its node "
                          "config and the operator runs `flwr run`)")
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                      cfg.in_channels, cfg.num_classes)
    if partitions:
        make_client_splits(ds.train.labels, ds.test.labels, ds.num_classes, cfg.num_clients,
                           cfg.alpha, cfg.seed, cfg.val_fraction, cfg.min_partition_size)


def is_user_error(err: BaseException) -> bool:
    """A bad input to report in one line: the project's own errors (any exception class
    defined in ``fedbicross_flwr``), ``OSError`` and invalid TOML.
    """
    if isinstance(err, (OSError, tomllib.TOMLDecodeError)):
        return True
    return any(cls.__module__.split(".")[0] == "fedbicross_flwr" for cls in type(err).__mro__)


def error_line(err: BaseException) -> str:
    """The one line printed for a user error."""
    prefix = "configuration error" if isinstance(err, ConfigError) else "error"
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{prefix}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedbicross``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except Exception as err:  # noqa: BLE001 - user errors become one line, others re-raise
        if not is_user_error(err):
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(error_line(err), file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``fedbicross`` argument parser and its subcommands."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, also print the Python traceback")
    parser = argparse.ArgumentParser(prog="fedbicross", description=__doc__, parents=[debug],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment in this process", parents=[debug])
    run.add_argument("--preset", help="a TOML file of run-config keys (conf/*.toml)")
    run.add_argument("--run-config", default="", help="overrides, as for `flwr run`")
    run.add_argument("--engine", choices=("direct", "apps", "grid"), default="direct",
                     help="direct: library calls (no Flower runtime); apps: the real ServerApp "
                          "and ClientApp over an in-process Flower Grid ('grid', the old "
                          "name, is refused with the new one)")
    run.add_argument("--methods", default="",
                     help="comma-separated server methods run on the SAME trained clients, "
                          "e.g. fedavg1,local,fedbicross (as run-config methods)")
    run.add_argument("--client-cache", default="",
                     help="folder of the trained-client cache (direct engine): clients are "
                          "trained once per dataset/partition/local settings and reused")
    sim = sub.add_parser("simulate", help="a real `flwr run` simulation (SuperLink + Ray) that "
                         "waits for the result, fails loudly, and cleans up its processes",
                         parents=[debug])
    sim.add_argument("--preset", help="a TOML file of run-config keys (conf/*.toml)")
    sim.add_argument("--run-config", default="", help="overrides, as for `flwr run`")
    sim.add_argument("--num-supernodes", type=int, default=0,
                     help="simulated clients (default: num-clients of the config)")
    sim.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds")
    table = sub.add_parser("config-table", help="print the run-config keys as a Markdown "
                           "table; --write puts it into docs/CONFIG.md and the defaults into "
                           "pyproject.toml", parents=[debug])
    table.add_argument("--write", action="store_true",
                       help="rewrite docs/CONFIG.md's table and pyproject.toml's "
                       "[tool.flwr.app.config] instead of printing")
    table.add_argument("--root", type=Path, default=Path("."),
                       help="the project folder holding docs/CONFIG.md and pyproject.toml")
    bench = sub.add_parser("bench", help="time the FedBiCross server stage against a "
                           "reference-style implementation on the same inputs (docs/BENCHMARKS.md)",
                           parents=[debug])
    from fedbicross_flwr.experiments.benchmark.cli import add_arguments

    add_arguments(bench)
    grid = sub.add_parser("grid", help="run (or resume) an experiment grid from a preset "
                          "(conf/grid-*.toml) and write its CSV, tables and figures",
                          parents=[debug])
    from fedbicross_flwr.experiments.harness import cli as grid_cli

    grid_cli.add_arguments(grid)
    check = sub.add_parser("distill-check", help="distil ONE central teacher into a fresh "
                           "student from synthetic data only, and report the retention",
                           parents=[debug])
    from fedbicross_flwr.experiments import distill_check

    distill_check.add_arguments(check)
    audit = sub.add_parser("privacy-audit", help="what a finished one-process run reveals: "
                           "membership inference on the uploads and the personalized models, "
                           "nearest training/test images of the synthetic images "
                           "(docs/PRIVACY.md)", parents=[debug])
    audit.add_argument("run_dir", help="the run folder (with run_config.json)")
    audit.add_argument("--client-cache", required=True,
                       help="the trained-client cache the run was made with "
                            "(`fedbicross run --client-cache DIR`)")
    audit.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    audit.add_argument("--pairs", type=int, default=8,
                       help="synthetic images shown with their nearest training and test "
                            "images in privacy-audit-pairs.png")
    return parser


def privacy_audit_command(run_dir: Path, cache_dir: Path, device: str, pairs: int) -> int:
    """``fedbicross privacy-audit``: audit, write ``<run>/privacy-audit.*``, print the report."""
    from fedbicross_flwr.privacy.audit import run_audit
    from fedbicross_flwr.privacy.report import markdown
    from fedbicross_flwr.training import resolve_device

    if pairs < 1:
        raise ConfigError(f"--pairs must be at least 1, got {pairs}")
    run_dir = run_dir.resolve()
    report = run_audit(run_dir, cache_dir.resolve(), resolve_device(device), pairs)
    print(markdown(report))
    print(f"written: {run_dir / 'privacy-audit.json'}, {run_dir / 'privacy-audit.md'}")
    return 0


def config_table_command(args: argparse.Namespace) -> int:
    """``fedbicross config-table``: print the key table, or rewrite its mirrors (``--write``)."""
    if not args.write:
        print(markdown_table())
        return 0
    from fedbicross_flwr.config.table import write_mirrors

    for path in write_mirrors(args.root):
        print(f"updated {path}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    """``fedbicross bench``: the server-stage benchmark."""
    from fedbicross_flwr.experiments.benchmark.cli import run_command as run_bench

    return run_bench(args)


def grid_command(args: argparse.Namespace) -> int:
    """``fedbicross grid``: run (or resume) an experiment grid."""
    from fedbicross_flwr.experiments.harness import cli as grid_cli

    return grid_cli.run_command(args)


def distill_check_command(args: argparse.Namespace, cfg: RunConfig, root: Path | None,
                          start: float) -> int:
    """``fedbicross distill-check``: distil one central teacher into a fresh student."""
    from fedbicross_flwr.experiments import distill_check

    return distill_check.run_command(args, cfg)


def simulate_command(args: argparse.Namespace, cfg: RunConfig, root: Path | None,
                     start: float) -> int:
    """``fedbicross simulate``: a real ``flwr run``; prints the comparison (or summary) table."""
    from fedbicross_flwr.runners.simulation import simulate

    overrides = {**(load_preset(args.preset) if args.preset else {}),
                 **parse_overrides(args.run_config)}
    n = args.num_supernodes or cfg.num_clients
    overrides["num-clients"] = n
    result = simulate(root or Path.cwd(), overrides, n, timeout=args.timeout)
    log(logging.INFO, "flwr run %s: %s %s (%.1f s)", result.run_id, result.status,
        result.details, time.perf_counter() - start)
    log(logging.INFO, "waiting for the run cost %.1f s of CPU (this process, `flwr log`, status "
        "calls): %.2f %% of the %.0f s of CPU the machine spent meanwhile", result.wait_cpu_s,
        100 * result.wait_share, result.machine_cpu_s)
    if result.memory:
        roles = ", ".join(f"{role} {r['peak-sum-mib']:.0f} MiB ({r['processes']} processes)"
                          for role, r in result.memory["roles"].items())
        log(logging.INFO, "peak memory %.0f MiB in all: %s", result.memory["peak-total-mib"],
            roles)
    if not result.ok or result.run_dir is None:
        print(f"simulation failed: {result.status} {result.details}", file=sys.stderr)
        return 1
    write_text(result.run_dir / "resources.json", json.dumps({
        "wall-s": round(time.perf_counter() - start, 1), "num-supernodes": n,
        "wait-cpu-s": round(result.wait_cpu_s, 1),
        "machine-cpu-s": round(result.machine_cpu_s, 1), "memory": result.memory}, indent=2))
    table = result.run_dir / "comparison.md"
    table = table if table.is_file() else result.run_dir / "summary.md"
    print(table.read_text())
    print(f"results: {result.run_dir}")
    return 0


def direct_methods_command(args: argparse.Namespace, cfg: RunConfig, start: float) -> int:
    """``fedbicross run --engine direct`` with several methods (or a client cache)."""
    from fedbicross_flwr.runners.direct import run_direct_methods

    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else cfg.method_list)
    run_dirs = run_direct_methods(cfg, methods, Path(args.client_cache).resolve()
                                  if args.client_cache else None)
    log(logging.INFO, "wall time %.1f s", time.perf_counter() - start)
    comparison = run_dirs.pop("comparison", None)
    for run_dir in run_dirs.values():
        print((run_dir / "summary.md").read_text())
        print(f"results: {run_dir}\n")
    if comparison is not None:
        print((comparison / "comparison.md").read_text())
        print(f"comparison and summary picture: {comparison}")
    return 0


def run_experiment_command(args: argparse.Namespace, cfg: RunConfig, root: Path | None,
                           start: float) -> int:
    """``fedbicross run``: one experiment in this process (direct or in-process Flower)."""
    if args.engine == "direct" and (args.methods or args.client_cache or cfg.methods):
        return direct_methods_command(args, cfg, start)
    if args.engine == "direct":
        from fedbicross_flwr.runners.direct import run_direct

        run_dir = run_direct(cfg)
    else:
        from fedbicross_flwr.runners.inprocess import run_in_process

        _, run_dir = run_in_process(cfg.to_run_config(), cfg.num_clients)
    log(logging.INFO, "wall time %.1f s", time.perf_counter() - start)
    if (run_dir / "comparison.md").is_file():  # the ServerApp returned the comparison folder
        print((run_dir / "comparison.md").read_text())
        print(f"comparison and summary picture: {run_dir}")
        return 0
    print(json.dumps({"run-dir": str(run_dir),
                      "summary": json.loads((run_dir / "summary.json").read_text())
                      }, indent=2))
    return 0


def privacy_audit_args_command(args: argparse.Namespace) -> int:
    """``fedbicross privacy-audit`` from its parsed arguments."""
    return privacy_audit_command(Path(args.run_dir), Path(args.client_cache), args.device,
                                 args.pairs)


# Subcommands that need no run config: name -> handler(args).
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "config-table": config_table_command,
    "bench": bench_command,
    "grid": grid_command,
    "privacy-audit": privacy_audit_args_command,
}
# Subcommands that run on the validated run config: name -> handler(args, cfg, root, start).
CONFIG_COMMANDS: dict[str, Callable[[argparse.Namespace, RunConfig, Path | None, float], int]] = {
    "distill-check": distill_check_command,
    "simulate": simulate_command,
    "run": run_experiment_command,
}


def run_command(args: argparse.Namespace) -> int:
    """Carry out the parsed command; user errors propagate to :func:`main`.

    Commands of :data:`COMMANDS` run on their arguments alone; those of
    :data:`CONFIG_COMMANDS` on the run config built from pyproject, the preset and the
    overrides, checked by :func:`preflight` first.
    """
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    from fedbicross_flwr.data.datasets import project_root

    root = project_root()
    cfg, values = build_config(args.preset, args.run_config,
                               root / "pyproject.toml" if root else None)
    if args.command == "distill-check":
        cfg = cfg.replace(dataset=args.dataset)
    if args.command == "run" and args.methods:  # as run-config methods, in both engines
        cfg = cfg.replace(methods=args.methods)  # validates every name before any training
    if args.command == "run" and args.engine == "grid":
        raise ConfigError("--engine grid is now --engine apps (the project's ServerApp and "
                          "ClientApp in this process; not `fedbicross grid`, the experiment "
                          "grids)")
    if args.command == "run" and args.engine == "apps" and args.client_cache:
        raise ConfigError("--client-cache is for the direct engine (the apps engine's "
                          "ClientApps train their own models)")
    preflight(cfg, partitions=args.command != "distill-check")  # one teacher, no clients
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    start = time.perf_counter()
    return CONFIG_COMMANDS[args.command](args, cfg, root, start)


if __name__ == "__main__":
    sys.exit(main())
