"""Run the cells of a grid, resuming where a previous invocation stopped.

A cell is finished when ``<out>/runs/<dataset>/a<alpha>-n<N>-s<seed>/<row>[-k<K>]/summary.json``
is a whole summary; finished cells are skipped. An interrupted cell is run again in its own folder with
``resume=true`` (FedBiCross continues from its checkpoints). Cells that share their clients
(same dataset, alpha, N, seed and local-training settings) share one in-process transport, so
the clients are trained once per invocation, and at most once overall with a client cache.
A failing cell is logged and listed in ``failed_cells.txt``; the grid goes on.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.experiments.harness.spec import Cell, GridSpec
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.reports.results import read_summary
from fedbicross_flwr.storage.atomic import write_text
from fedbicross_flwr.storage.client_cache import producer

# (cell, its run config, the transport shared by its group) -> run folder
CellRunner = Callable[[Cell, RunConfig, Any], Path]
# run config -> a transport (the in-process clients of a group)
TransportFactory = Callable[[RunConfig], Any]


def run_dir_of(out_dir: Path, cell: Cell) -> Path:
    """Where a cell's run folder lives."""
    return out_dir / "runs" / cell.group_dir / cell.run_name


def is_finished(out_dir: Path, cell: Cell) -> bool:
    """A cell is finished when its run's summary is whole (:func:`~fedbicross_flwr.reports.
    results.read_summary`); a cell with an empty or cut-short ``summary.json`` runs again.
    """
    return read_summary(run_dir_of(out_dir, cell)) is not None


def default_cell_runner(cell: Cell, cfg: RunConfig, transport: Any) -> Path:
    """Run one cell's three phases through the server protocol."""
    from fedbicross_flwr.server import run_server

    return run_server(cfg, transport)


def direct_transports(cache_dir: Path | None) -> TransportFactory:
    """In-process clients (no Flower runtime), with the trained-client cache when given."""
    def make(cfg: RunConfig) -> Any:
        from fedbicross_flwr.transports.direct import DirectTransport

        return DirectTransport(cfg, cache_dir)

    return make


@dataclass
class GridProgress:
    """What one invocation did."""

    total: int = 0
    skipped: int = 0  # already finished before this invocation
    ran: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _eta(progress: GridProgress, remaining: int) -> str:
    if not progress.seconds:
        return "unknown until the first cell finishes"
    secs = remaining * sum(progress.seconds) / len(progress.seconds)
    return f"{secs / 60:.0f} min ({remaining} cells at {sum(progress.seconds) / len(progress.seconds):.0f} s)"


def run_grid(spec: GridSpec, out_dir: Path, make_transport: TransportFactory,
             run_cell: CellRunner = default_cell_runner) -> GridProgress:
    """Run every unfinished cell of ``spec`` under ``out_dir``; returns what was done."""
    cells = spec.cells()
    todo = [c for c in cells if not is_finished(out_dir, c)]
    progress = GridProgress(total=len(cells), skipped=len(cells) - len(todo))
    log(logging.INFO, "[grid %s] %d cells, %d finished already, %d to run", spec.name,
        len(cells), progress.skipped, len(todo))
    transports: dict[str, Any] = {}  # one per set of clients; the last group's only
    broken: dict[str, str] = {}  # groups whose clients could not be set up -> reason
    for i, cell in enumerate(todo):
        cfg = spec.run_config(cell, out_dir / "runs")
        group = repr((cell.group_dir, sorted(producer(cfg).items())))
        if group not in transports and group not in broken:
            transports.clear()  # free the previous group's clients
            try:
                transports[group] = make_transport(cfg)
            except Exception as err:  # noqa: BLE001 - e.g. an infeasible partition: skip the group
                broken[group] = f"{type(err).__name__}: {err}"
                log(logging.ERROR, "[grid %s] clients of %s could not be set up; its cells "
                    "fail:\n%s", spec.name, cell.group_dir, traceback.format_exc())
        if group in broken:
            progress.failed.append((cell, broken[group]))
            continue
        log(logging.INFO, "[grid %s] cell %d/%d (%d done before): %s; ETA %s", spec.name,
            i + 1, len(todo), progress.skipped, cell.describe(),
            _eta(progress, len(todo) - i))
        start = time.perf_counter()
        try:
            run_cell(cell, cfg, transports[group])
        except Exception as err:  # noqa: BLE001 - one failing cell must not stop the grid
            log(logging.ERROR, "[grid %s] cell %s failed:\n%s", spec.name, cell.describe(),
                traceback.format_exc())
            progress.failed.append((cell, f"{type(err).__name__}: {err}"))
            continue
        progress.seconds.append(time.perf_counter() - start)
        progress.ran.append(cell)
    if progress.failed:
        write_text(out_dir / "failed_cells.txt", "".join(
            f"{c.describe()}: {reason}\n" for c, reason in progress.failed))
    log(logging.INFO, "[grid %s] ran %d cells (%.1f min), %d failed, %d were finished before",
        spec.name, len(progress.ran), sum(progress.seconds) / 60, len(progress.failed),
        progress.skipped)
    return progress
