"""Where does the paper's ordering hold? One-shot methods ranked per column of a grid.

    python scripts/grid_ordering.py outputs/grid-grid-cpu/cells.csv [--metric official-after]

For every (dataset, alpha, N) column: the one-shot rows (the paper's baselines and FedBiCross
per K) sorted by their mean over seeds, FedBiCross's rank, its margin over the best baseline
and over FedAvg-1, and how many seeds FedBiCross wins against each baseline. Then the same
for the ablation rows against the full method where a column has them. Markdown on stdout;
quoted in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from fedbicross_flwr.harness.collect import read_cells_csv
from fedbicross_flwr.harness.tables import BASELINES, row_group, row_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path)
    parser.add_argument("--metric", default="official-after")
    args = parser.parse_args()
    rows = [r for r in read_cells_csv(args.cells) if r.get(args.metric) is not None]
    by_column: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by_column[(r["dataset"], r["alpha"], r["num-clients"])][row_label(r)][r["seed"]] = \
            100 * r[args.metric]
    groups = {row_label(r): row_group(r) for r in rows}
    print("| column | one-shot methods, best first (mean over seeds, %) | FedBiCross rank | "
          "vs best baseline | vs fedavg1 | seeds won vs each baseline |")
    print("|---|---|---|---|---|---|")
    for (dataset, alpha, n), methods in by_column.items():
        ours = [m for m in methods if groups[m] == "ours"]
        one_shot = {m: statistics.fmean(v.values()) for m, v in methods.items()
                    if m in BASELINES or m in ours}
        ranking = sorted(one_shot, key=one_shot.get, reverse=True)
        listing = ", ".join(f"{m} {one_shot[m]:.2f}" for m in ranking)
        for mine in ours:
            base = {m: s for m, s in one_shot.items() if m in BASELINES}
            best = max(base, key=base.get) if base else None
            wins = []
            for b in BASELINES:
                shared = set(methods[mine]) & set(methods.get(b, {}))
                if shared:
                    won = sum(methods[mine][s] > methods[b][s] for s in shared)
                    wins.append(f"{b} {won}/{len(shared)}")
            vs_best = f"{one_shot[mine] - base[best]:+.2f} ({best})" if best else "-"
            vs_avg = (f"{one_shot[mine] - one_shot['fedavg1']:+.2f}" if "fedavg1" in one_shot
                      else "-")
            print(f"| {dataset} α={alpha:g} N={n} | {listing} | {ranking.index(mine) + 1} of "
                  f"{len(ranking)} | {vs_best} | {vs_avg} | {', '.join(wins)} |")
    ablations = [(c, m) for c, methods in by_column.items() for m in methods
                 if groups[m] == "ablation"]
    if ablations:
        print("\n| column | full method | ablation rows (mean over seeds, %) |")
        print("|---|---|---|")
        for column in dict.fromkeys(c for c, _ in ablations):
            methods = by_column[column]
            full = [m for m in methods if groups[m] == "ours"]
            listing = ", ".join(f"{m} {statistics.fmean(methods[m].values()):.2f}"
                                for c, m in ablations if c == column)
            fulls = ", ".join(f"{m} {statistics.fmean(methods[m].values()):.2f}" for m in full)
            dataset, alpha, n = column
            print(f"| {dataset} α={alpha:g} N={n} | {fulls} | {listing} |")


if __name__ == "__main__":
    main()
