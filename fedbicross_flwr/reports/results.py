"""The run folder: what a run writes, in files a person can read.

``<output-dir>/<run-name>/``
    ``run_config.json``   every key of the run (after presets and overrides)
    ``clients.csv``       one row per client, keyed by partition-id
    ``summary.json``      means over clients; ``acc_after_mean`` is the paper's metric; who
                          scored it (``scored-by``), its median and per-site figures
                          (:mod:`fedbicross_flwr.reports.headline`)
    ``summary.md``        the same as a small Markdown table
    ``log.txt``           the server log
    plus whatever the method writes (clusters, weights, synthetic images ...)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import project_root
from fedbicross_flwr.logging_utils import LOG_FORMAT, LOGGER, log
from fedbicross_flwr.reports.headline import per_site_text
from fedbicross_flwr.storage.atomic import json_safe, open_text, write_text

CLIENT_COLUMNS = [
    "partition-id", "cluster", "n-train", "n-test", "n-test-personal",
    "local-val-acc", "local-test-acc", "local-test-acc-personal",
    "acc-before", "acc-after", "acc-personal-before", "acc-personal-after",
    "train-seconds", "bytes-up", "bytes-down", "status",
]


def default_output_dir() -> Path:
    """$FEDBICROSS_OUTPUT_DIR, else <project>/outputs, else ~/fedbicross-flwr/outputs."""
    env = os.environ.get("FEDBICROSS_OUTPUT_DIR", "")
    if env:
        return Path(env).expanduser().resolve()
    root = project_root()
    if root is not None:
        return root / "outputs"
    return Path.home() / "fedbicross-flwr" / "outputs"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` if the run finished, else None.

    A run is finished when its ``summary.json`` is a JSON object. A missing file, or one that
    is empty, cut short or not an object (a crash or a full disk while it was written), means
    the run did not finish: it may be resumed, and that is logged.
    """
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_bytes())
    except (ValueError, OSError) as err:  # UnicodeDecodeError is a ValueError
        summary = err
    if isinstance(summary, dict):
        return summary
    log(logging.WARNING, "%s is not a whole summary (%s): the run did not finish", path,
        f"{path.stat().st_size} bytes, {type(summary).__name__}")
    return None


def finished_run_dir(cfg: RunConfig) -> Path | None:
    """With ``resume=true``: the folder ``run-name`` if that run finished (:func:`read_summary`)."""
    if not (cfg.resume and cfg.run_name):
        return None
    path = (Path(cfg.output_dir) if cfg.output_dir else default_output_dir()) / cfg.run_name
    return path if read_summary(path) is not None else None


def create_run_dir(cfg: RunConfig) -> Path:
    """Make a NEW run folder; an existing one is never overwritten (a suffix is added).

    With ``resume=true`` the folder ``run-name`` is reused when it exists (its checkpoints are
    continued); a finished run (a whole ``summary.json``, :func:`read_summary`) is refused
    rather than overwritten.
    """
    base = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.dataset}-{cfg.method}"
    path = base / name
    if cfg.resume and path.is_dir():
        if read_summary(path) is not None:
            raise FileExistsError(f"run {path} already finished (summary.json exists); nothing "
                                  "to resume. Use another run-name to run again.")
        return path
    suffix = 1
    while path.exists():
        path = base / f"{name}-{suffix}"
        suffix += 1
    path.mkdir(parents=True)
    return path


@contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """Also write the log to ``path`` (a run folder's ``log.txt``) until the block ends."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        handler.close()


def write_clients_csv(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One row per client; a missing value is an empty cell (written whole or not at all)."""
    rows = sorted(rows, key=lambda r: r["partition-id"])
    with open_text(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CLIENT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if json_safe(row.get(k)) is None else row.get(k))
                             for k in CLIENT_COLUMNS})
    return path


def finite_mean(values: Iterable[float | None]) -> float | None:
    """Mean of the finite values (None, NaN and inf left out); None if there is none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def percent(value: float | None, unit: str = "") -> str:
    """A fraction as a percentage with two decimals (``unit`` appended), or "n/a" for None."""
    return "n/a" if value is None else f"{100 * value:.2f}{unit}"


def summarize(rows: list[dict[str, Any]], cfg: RunConfig, extra: dict[str, Any]) -> dict:
    """Means over the clients that answered (missing clients are counted, not averaged in)."""
    done = [r for r in rows if r.get("status") == "ok"]
    summary = {
        "method": cfg.method, "dataset": cfg.dataset, "alpha": cfg.alpha, "seed": cfg.seed,
        "num-clients": len(rows), "num-completed": len(done),
        "missing-partitions": sorted(r["partition-id"] for r in rows if r.get("status") != "ok"),
    }
    for col in ("acc-after", "acc-before", "acc-personal-after", "acc-personal-before",
                "local-test-acc", "local-test-acc-personal"):
        summary[f"{col}-mean"] = finite_mean([r.get(col) for r in done])
    summary["paper-metric"] = summary["acc-after-mean"]
    summary.update(extra)
    return summary


def write_summary_md(path: Path, summary: dict[str, Any], extra: str = "") -> Path:
    """A short Markdown version of ``summary.json``, then ``extra`` (more Markdown, e.g. the
    knowledge table), written whole or not at all.
    """
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    lines = [
        f"# {summary['method']} on {summary['dataset']} (alpha {summary['alpha']}, "
        f"seed {summary['seed']}, {summary['num-completed']}/{summary['num-clients']} clients)",
        "",
        "| view | local model | received model (before pers.) | after personalization |",
        "|---|---|---|---|",
        f"| official test (paper metric) | {pct(summary['local-test-acc-mean'])} | "
        f"{pct(summary['acc-before-mean'])} | **{pct(summary['acc-after-mean'])}** |",
        f"| label-following test | {pct(summary['local-test-acc-personal-mean'])} | "
        f"{pct(summary['acc-personal-before-mean'])} | "
        f"{pct(summary['acc-personal-after-mean'])} |",
        "",
        f"Majority-class rate of the official test split: {pct(summary.get('majority-rate'))}",
    ]
    if "scored-by" in summary:
        sites = per_site_text(summary.get("acc-after-per-site"),
                              summary.get("acc-after-outliers") or ())
        lines += ["", f"Accuracies scored by: {summary['scored-by']}. Per site, official test "
                  f"after personalization (paper metric): {sites}; median "
                  f"{pct(summary.get('acc-after-median'))}, mean "
                  f"{pct(summary['acc-after-mean'])}."]
        if summary.get("acc-after-outliers"):
            lines.append(f"Sites far from the others (self-reported figures; "
                         f"{summary['outlier-rule']}): {summary['acc-after-outliers']}")
    if summary.get("missing-partitions"):
        lines.append(f"Missing clients (not averaged in): {summary['missing-partitions']}")
    if extra:
        lines += ["", extra]
    return write_text(path, "\n".join(lines) + "\n")
