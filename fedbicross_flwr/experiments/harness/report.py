"""Everything a grid writes next to its ``runs/`` folder.

``cells.csv``                   one row per finished cell (see :mod:`.collect`)
``tables.md``                   the paper's Tables I-III layout, three views, where the
                                knowledge goes per column (teacher, start, received,
                                personalized), the ranking of the one-shot methods per column
                                (:mod:`.ordering`), links
``accuracy-vs-alpha-n<N>.png``  accuracy against alpha per method (official test)
``fig2-clustering.png``         bar chart like the paper's Fig. 2
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedbicross_flwr.experiments.harness.collect import cell_rows, write_cells_csv
from fedbicross_flwr.experiments.harness.ordering import ranking_tables
from fedbicross_flwr.experiments.harness.plots import accuracy_vs_alpha, fig2_bars
from fedbicross_flwr.experiments.harness.runner import run_dir_of
from fedbicross_flwr.experiments.harness.spec import GridSpec
from fedbicross_flwr.experiments.harness.tables import (
    cost_tables,
    paper_tables,
    retention_tables,
    row_label,
)
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.reports.results import read_summary
from fedbicross_flwr.storage.atomic import write_text

ARTEFACTS = ("synthetic.png", "weights.png", "rounds.csv", "clusters.csv")


def fig2_labels(spec: GridSpec, rows: list[dict[str, Any]]) -> list[str]:
    """The preset's ``fig2-rows`` (clustering variants), else FedBiCross per K."""
    wanted = set(spec.fig2_rows) or {"fedbicross"}
    return list(dict.fromkeys(row_label(r) for r in rows if r["row"] in wanted))


def artefact_links(spec: GridSpec, out_dir: Path) -> str:
    """A table linking every finished cell's images and learned weights (relative links)."""
    lines = ["| cell | run folder | artefacts | final cross-cluster weights |",
             "|---|---|---|---|"]
    for cell in spec.cells():
        run_dir = run_dir_of(out_dir, cell)
        summary = read_summary(run_dir)
        if summary is None:  # not finished
            continue
        rel = run_dir.relative_to(out_dir)
        links = [f"[{name}]({rel}/{name})" for name in ARTEFACTS if (run_dir / name).is_file()]
        links += [f"[{p.name}]({rel}/{p.name})" for p in sorted(run_dir.glob("*.png"))
                  if p.name not in ARTEFACTS]
        diag = summary.get("method-diagnostics") or {}
        weights = diag.get("final-weights")
        lines.append(f"| {cell.describe()} | [{rel}]({rel}/summary.md) | "
                     f"{', '.join(links) or '-'} | {weights if weights is not None else '-'} |")
    return "\n".join(lines)


def _section(title: str, intro: str, tables: str) -> list[str]:
    """Lines of one report section: heading, one paragraph, its tables; none without tables."""
    return [f"## {title}", "", intro, "", tables, ""] if tables else []


def retention_section(rows: list[dict[str, Any]]) -> list[str]:
    """Lines of the knowledge-flow section (teacher, start, received, personalized); none
    when no finished cell has a ``knowledge.json``.
    """
    return _section("Where the knowledge goes, per column",
                    "For every distilling row: the teacher ceiling, the student's start, the "
                    "received model and the model after personalization (official test split, "
                    "mean ± std over seeds, from each run's knowledge.json).",
                    retention_tables(rows))


def cost_section(rows: list[dict[str, Any]]) -> list[str]:
    """Lines of the accuracy-and-cost section; none when no cell recorded its cost."""
    return _section("Accuracy and cost, per column",
                    "Official test split after personalization (%, mean ± std over seeds) next "
                    "to what each method cost a client over the whole run: megabytes sent and "
                    "received (Flower messages, or the model arrays on the direct engine), model "
                    "exchanges, and the server stage's seconds.", cost_tables(rows))


def ranking_section(rows: list[dict[str, Any]]) -> list[str]:
    """Lines of the "where the paper's ordering holds" section; none without FedBiCross rows."""
    return _section("Ranking of the one-shot methods per column",
                    "Official test split after personalization, mean over seeds; FedBiCross's "
                    "rank and margins, and the seeds it wins against each baseline.",
                    ranking_tables(rows))


def write_report(spec: GridSpec, out_dir: Path) -> Path:
    """Collect the finished cells and write the CSV, tables and figures; returns tables.md."""
    rows = cell_rows(spec, out_dir)
    write_cells_csv(out_dir / "cells.csv", rows)
    figures = []
    for n in sorted({r["num-clients"] for r in rows}):
        p = accuracy_vs_alpha(rows, out_dir / f"accuracy-vs-alpha-n{n}.png", n)
        if p is not None:
            figures.append(p.name)
    labels = fig2_labels(spec, rows)
    if labels and fig2_bars(rows, out_dir / "fig2-clustering.png", labels) is not None:
        figures.append("fig2-clustering.png")
    total = len(spec.cells())
    text = "\n".join([
        f"# Grid `{spec.name}`: {len(rows)} of {total} cells finished",
        "",
        "Accuracy in %, mean over the clients of each run, then mean ± sample std over seeds. "
        "Every row of a column uses the same clients (partition, local models) and the same "
        "evaluation. All cells: `cells.csv`.",
        "",
        paper_tables(rows) if rows else "(no finished cells yet)",
        *retention_section(rows),
        *cost_section(rows),
        *ranking_section(rows),
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        "## Per-cell artefacts",
        "",
        artefact_links(spec, out_dir),
        "",
    ])
    path = write_text(out_dir / "tables.md", text)
    log(logging.INFO, "[grid %s] report: %s (%d/%d cells)", spec.name, path, len(rows), total)
    return path
