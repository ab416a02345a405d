"""``fedbicross grid``: arguments and entry point.

Examples
--------
fedbicross grid --preset conf/grid-cpu.toml                 # run (or resume), then report
fedbicross grid --preset conf/grid-cpu.toml --dry-run       # list the cells and stop
fedbicross grid --preset conf/grid-cpu.toml --report-only   # tables/plots from what exists
fedbicross grid --preset conf/grid-cpu.toml --datasets digits --alphas 0.1   # one column
fedbicross grid --preset conf/grid-cpu.toml --rows local,fedavg1,central        # some rows
fedbicross grid --preset conf/grid-cpu.toml --run-config "pers-epochs=1"       # other keys
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedbicross_flwr.experiments.harness.spec import GridSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedbicross grid``."""
    parser.add_argument("--preset", required=True, help="grid preset (conf/grid-*.toml)")
    parser.add_argument("--out", default="",
                        help="output folder (default: <output-dir>/grid-<preset name>); "
                             "running again resumes there")
    parser.add_argument("--client-cache", default="",
                        help="trained-client cache folder (default: <out>/client-cache)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild cells.csv, tables.md and the figures")
    parser.add_argument("--datasets", default="",
                        help="comma-separated: run only these of the preset's datasets")
    parser.add_argument("--alphas", default="",
                        help="comma-separated: run only these of the preset's alphas")
    parser.add_argument("--seeds", default="",
                        help="comma-separated: these seeds instead of the preset's")
    parser.add_argument("--rows", default="",
                        help="comma-separated: run only these of the preset's rows")
    parser.add_argument("--run-config", default="",
                        help="run-config keys set on top of the preset's [run-config], as for "
                             "`flwr run` (not the per-cell keys such as dataset or seed)")


def narrowed(spec: "GridSpec", datasets: str, alphas: str, seeds: str,
             rows: str = "") -> "GridSpec":
    """``spec`` restricted to the named datasets / alphas / rows, run with the named seeds.

    Raises
    ------
    ConfigError
        A dataset, alpha or row the preset does not have, or a seed that is not an
        integer >= 0.
    """
    from fedbicross_flwr.config.run_config import ConfigError
    from fedbicross_flwr.experiments.harness.spec import replace

    def items(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    changes: dict = {}
    if items(datasets):
        unknown = sorted(set(items(datasets)) - set(spec.datasets))
        if unknown:
            raise ConfigError(f"--datasets: {unknown} not in the preset's {list(spec.datasets)}")
        changes["datasets"] = tuple(d for d in spec.datasets if d in items(datasets))
    if items(alphas):
        try:
            wanted = {float(a) for a in items(alphas)}
        except ValueError:
            raise ConfigError(f"--alphas: {alphas!r} is not a list of numbers") from None
        unknown_alphas = sorted(wanted - set(spec.alphas))
        if unknown_alphas:
            raise ConfigError(f"--alphas: {unknown_alphas} not in the preset's "
                              f"{list(spec.alphas)}")
        changes["alphas"] = tuple(a for a in spec.alphas if a in wanted)
    if items(seeds):
        if not all(t.isdigit() for t in items(seeds)):
            raise ConfigError(f"--seeds: {seeds!r} is not a list of integers >= 0")
        changes["seeds"] = tuple(int(t) for t in items(seeds))
    if items(rows):
        names = [r.name for r in spec.rows]
        unknown = sorted(set(items(rows)) - set(names))
        if unknown:
            raise ConfigError(f"--rows: {unknown} not in the preset's {names}")
        changes["rows"] = tuple(r for r in spec.rows if r.name in items(rows))
    return replace(spec, **changes) if changes else spec


def with_overrides(spec: "GridSpec", text: str) -> "GridSpec":
    """``spec`` with run-config keys (``"key=value ..."``) set on top of its [run-config].

    Raises
    ------
    ConfigError
        A key the grid sets per cell (dataset, alpha, seed, ...), or a value any cell refuses.
    """
    from fedbicross_flwr.config.run_config import ConfigError, parse_overrides
    from fedbicross_flwr.experiments.harness.spec import CELL_KEYS, replace

    overrides = parse_overrides(text) if text.strip() else {}
    if not overrides:
        return spec
    fixed = (CELL_KEYS - {"num-clusters"}) & set(overrides)
    if fixed:
        raise ConfigError(f"--run-config may not set {sorted(fixed)} (the grid sets them per "
                          "cell; use --datasets / --alphas / --seeds)")
    out = replace(spec, base={**spec.base, **overrides})
    for cell in out.cells():  # fail before any training, naming the key
        out.run_config(cell, Path("/tmp"))
    return out


def run_command(args: argparse.Namespace) -> int:
    """Run the grid (unfinished cells only) and write its report; 2 on a preset error."""
    from fedbicross_flwr.config.run_config import ConfigError
    from fedbicross_flwr.experiments.harness.spec import load_grid_preset

    try:
        spec = with_overrides(narrowed(load_grid_preset(args.preset), args.datasets,
                                       args.alphas, args.seeds, args.rows), args.run_config)
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    from fedbicross_flwr.experiments.harness.report import write_report
    from fedbicross_flwr.experiments.harness.runner import direct_transports, is_finished, run_grid
    from fedbicross_flwr.reports.results import default_output_dir

    out = Path(args.out).resolve() if args.out else default_output_dir() / f"grid-{spec.name}"
    cells = spec.cells()
    if args.dry_run:
        for cell in cells:
            print(f"{'done' if is_finished(out, cell) else 'todo'}  {cell.describe()}")
        print(f"{len(cells)} cells, {sum(is_finished(out, c) for c in cells)} finished; "
              f"output {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if spec.base.get("num-threads"):
        import torch

        torch.set_num_threads(int(spec.base["num-threads"]))
    if not args.report_only:
        from fedbicross_flwr.reports.results import logging_to

        cache = Path(args.client_cache).resolve() if args.client_cache else out / "client-cache"
        with logging_to(out / "grid-log.txt"):
            progress = run_grid(spec, out, direct_transports(cache))
        print(f"ran {len(progress.ran)} cells, {len(progress.failed)} failed, "
              f"{progress.skipped} finished before")
    report = write_report(spec, out)
    print(f"report: {report}")
    return 0
