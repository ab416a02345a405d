"""Where does the paper's ordering hold? The one-shot methods ranked per column of a grid.

For every (dataset, alpha, N) column: the one-shot rows (the paper's baselines and FedBiCross
per K) sorted by their mean over seeds, FedBiCross's rank, its margin over the best baseline
and over FedAvg-1, and how many seeds FedBiCross wins against each baseline. Then the ablation
rows against the full method, where a column has them. Part of ``tables.md``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from fedbicross_flwr.experiments.harness.tables import row_group, row_label
from fedbicross_flwr.methods.catalog import table_rows


def _by_column(rows: list[dict[str, Any]], metric: str
               ) -> dict[tuple, dict[str, dict[int, float]]]:
    """(dataset, alpha, N) -> row label -> seed -> metric in %."""
    out: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get(metric) is not None:
            out[(r["dataset"], r["alpha"], r["num-clients"])][row_label(r)][r["seed"]] = \
                100 * r[metric]
    return out


def ranking_tables(rows: list[dict[str, Any]], metric: str = "official-after") -> str:
    """Markdown: the ranking table, then the ablation table; empty without a FedBiCross row."""
    by_column = _by_column(rows, metric)
    baselines = table_rows("baseline")
    groups = {row_label(r): row_group(r) for r in rows}
    lines = []
    for (dataset, alpha, n), methods in by_column.items():
        ours = [m for m in methods if groups[m] == "ours"]
        one_shot = {m: statistics.fmean(v.values()) for m, v in methods.items()
                    if m in baselines or m in ours}
        ranking = sorted(one_shot, key=lambda m: one_shot[m], reverse=True)
        listing = ", ".join(f"{m} {one_shot[m]:.2f}" for m in ranking)
        for mine in ours:
            base = {m: s for m, s in one_shot.items() if m in baselines}
            best = max(base, key=lambda m: base[m]) if base else None
            wins = []
            for b in baselines:
                shared = set(methods[mine]) & set(methods.get(b, {}))
                if shared:
                    won = sum(methods[mine][s] > methods[b][s] for s in shared)
                    wins.append(f"{b} {won}/{len(shared)}")
            vs_best = f"{one_shot[mine] - base[best]:+.2f} ({best})" if best else "-"
            vs_avg = (f"{one_shot[mine] - one_shot['fedavg1']:+.2f}" if "fedavg1" in one_shot
                      else "-")
            lines.append(f"| {dataset} α={alpha:g} N={n} | {listing} | "
                         f"{ranking.index(mine) + 1} of {len(ranking)} | {vs_best} | {vs_avg} | "
                         f"{', '.join(wins)} |")
    if not lines:
        return ""
    text = ["| column | one-shot methods, best first (mean over seeds, %) | FedBiCross rank | "
            "vs best baseline | vs fedavg1 | seeds won vs each baseline |",
            "|---|---|---|---|---|---|", *lines]
    ablations = [(c, m) for c, methods in by_column.items() for m in methods
                 if groups[m] == "ablation"]
    if ablations:
        text += ["", "| column | full method | ablation rows (mean over seeds, %) |",
                 "|---|---|---|"]
        for column in dict.fromkeys(c for c, _ in ablations):
            methods = by_column[column]
            full = [m for m in methods if groups[m] == "ours"]
            listing = ", ".join(f"{m} {statistics.fmean(methods[m].values()):.2f}"
                                for c, m in ablations if c == column)
            fulls = ", ".join(f"{m} {statistics.fmean(methods[m].values()):.2f}" for m in full)
            dataset, alpha, n = column
            text.append(f"| {dataset} α={alpha:g} N={n} | {fulls} | {listing} |")
    return "\n".join(text)
