"""Markdown tables in the layout of the paper's Tables I-III.

One table per number of clients N (the paper: Table I N=5, II N=10, III N=20); methods as
rows, grouped as in the paper (baselines, FedBiCross per K, ablations) plus this project's
references (``local``, multi-round FedAvg/FedProx, ``central`` and, in the official-test
views, the majority-class rate of the official test split); dataset x alpha as columns. A
cell is the mean over seeds, in %, with the sample standard deviation over seeds
(``mean ± std``; a single seed shows the mean and ``(1 seed)``); a missing cell is ``-``.
:func:`gap_table` gives, in the same layout, the share of the majority-class -> ``central``
gap each method closes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from fedbicross_flwr.methods.catalog import table_rows

MAJORITY = "majority class"
VIEWS = {
    "official-after": "official test split, after personalization (the paper's metric)",
    "official-before": "official test split, the received model before personalization "
                       "(w/o PKD)",
    "personal-after": "label-following test split, after personalization",
}


def row_label(row: dict[str, Any]) -> str:
    """``fedbicross (K=2)`` for rows run per K, else the row name."""
    k = row.get("num-clusters")
    return row["row"] if k is None or k == "" else f"{row['row']} (K={int(k)})"


def row_group(row: dict[str, Any]) -> str:
    """Baseline / ours / ablation / reference, as in the paper's tables."""
    if row["row"] in table_rows("baseline"):
        return "baseline"
    if row["row"] == "fedbicross":
        return "ours"
    if row.get("method") == "fedbicross":
        return "ablation"
    return "reference"


def _order(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(group, label) in table order: groups as in the paper, rows in first-seen order."""
    rank = {"baseline": 0, "ours": 1, "ablation": 2, "reference": 3}
    fixed = {name: i for i, name in enumerate(table_rows("baseline") + table_rows("reference"))}
    seen: dict[tuple[str, str], tuple] = {}
    for i, r in enumerate(rows):
        key = (row_group(r), row_label(r))
        if key not in seen:
            seen[key] = (rank[key[0]], fixed.get(r["row"], len(fixed)), i)
    return sorted(seen, key=lambda k: seen[k])


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (1 seed)"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _columns_and_header(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, float]], list[str]]:
    """(dataset, alpha) columns in first-seen dataset order, and the table's two header lines."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    columns = [(d, a) for d in datasets
               for a in sorted({r["alpha"] for r in rows if r["dataset"] == d})]
    return columns, [f"| group | method | {' | '.join(f'{d} α={a:g}' for d, a in columns)} |",
                     "|---|---|" + "---|" * len(columns)]


# The paper's own Table I (N = 5), BloodMNIST column, accuracy % on the official test split
# after personalization; "w/o PKD" is its fedbicross (K=2) row before personalization.
# bloodmnist-pbc (the rebuilt archive) is compared with the same numbers.
_PAPER_BLOOD = {
    "fedavg1": (14.23, 16.37, 17.35, 18.26), "dafl": (13.42, 14.05, 15.74, 17.03),
    "dense": (42.34, 46.78, 50.45, 75.78), "fedisca": (48.49, 50.64, 53.28, 79.83),
    "coboosting": (54.75, 56.16, 58.41, 80.32), "fedbicross (K=2)": (84.94, 86.51, 87.15, 88.65),
    "fedbicross (K=3)": (83.31, 83.90, 87.67, 90.13),
    "fedbicross (K=4)": (85.57, 87.12, 85.63, 86.17),
    "intra-cluster": (80.01, 81.75, 83.07, 85.92), "uniform-cross": (81.66, 83.35, 84.44, 86.17),
    "sim-weighted": (82.99, 83.63, 85.13, 87.02), "wo-clus": (76.47, 76.41, 78.40, 82.64),
}
# (dataset, alpha, row label, view) -> the paper's number
PAPER_TABLE_I: dict[tuple[str, float, str, str], float] = {
    (dataset, alpha, label, "official-after"): values[i]
    for dataset in ("bloodmnist", "bloodmnist-pbc")
    for label, values in _PAPER_BLOOD.items()
    for i, alpha in enumerate((0.1, 0.2, 0.3, 0.5))}
PAPER_TABLE_I.update({(dataset, alpha, "fedbicross (K=2)", "official-before"): value
                      for dataset in ("bloodmnist", "bloodmnist-pbc")
                      for alpha, value in zip((0.1, 0.2, 0.3, 0.5),
                                              (77.69, 79.52, 81.15, 84.16))})


def paper_value(dataset: str, alpha: float, label: str, metric: str,
                num_clients: int) -> float | None:
    """The paper's own number for this cell (Table I, N = 5, BloodMNIST), or None."""
    return PAPER_TABLE_I.get((dataset, alpha, label, metric)) if num_clients == 5 else None


def paper_table(rows: list[dict[str, Any]], num_clients: int,
                metric: str = "official-after") -> str:
    """One Markdown table (methods x (dataset, alpha)) for ``num_clients``; where the paper
    reports the cell (Table I's BloodMNIST column), its number follows in brackets.
    """
    rows = [r for r in rows if r["num-clients"] == num_clients]
    columns, lines = _columns_and_header(rows)
    for group, label in _order(rows):
        cells = []
        for d, a in columns:
            vals = [r[metric] for r in rows if row_label(r) == label and r["dataset"] == d
                    and r["alpha"] == a and r.get(metric) is not None]
            paper = paper_value(d, a, label, metric, num_clients)
            cells.append(_fmt(vals) + ("" if paper is None else f" [paper {paper:.2f}]"))
        lines.append(f"| {group} | {label} | {' | '.join(cells)} |")
    if not metric.startswith("official"):  # the rate is of the official test split
        return "\n".join(lines)
    majority = []
    for d, a in columns:
        rates = [r["majority-rate"] for r in rows if r["dataset"] == d and r["alpha"] == a
                 and r.get("majority-rate") is not None]
        majority.append(f"{100 * rates[0]:.2f}" if rates else "-")
    lines.append(f"| reference | {MAJORITY} | {' | '.join(majority)} |")
    return "\n".join(lines)


MIN_GAP = 0.01  # central must beat the majority rate by a point for the ratio to mean anything


def gap_closed(value: float, majority: float, central: float,
               min_gap: float = MIN_GAP) -> float | None:
    """Share of the gap from the majority-class rate to ``central`` that ``value`` closes.

    (value - majority) / (central - majority): 0 at the trivial rate, 1 at centralised
    training; None when central does not beat the majority rate by at least ``min_gap``
    (accuracy as a fraction): a near-zero denominator would turn noise into huge ratios.
    """
    if central - majority < min_gap:
        return None
    return (value - majority) / (central - majority)


def gap_table(rows: list[dict[str, Any]], num_clients: int,
              metric: str = "official-after") -> str:
    """Per method and column: the share of the majority -> central gap closed, in %.

    Computed per seed against that seed's ``central`` row (same dataset, alpha, N and clients),
    then mean ± std over seeds like the accuracy tables; ``-`` where the column has no central
    row or central is within ``MIN_GAP`` of the majority rate in every seed. ``central``
    itself (100 by definition) is left out.
    """
    rows = [r for r in rows if r["num-clients"] == num_clients]
    central = {(r["dataset"], r["alpha"], r["seed"]): r[metric] for r in rows
               if r["row"] == "central" and r.get(metric) is not None}
    columns, lines = _columns_and_header(rows)
    for group, label in _order(rows):
        if label == "central":
            continue
        cells = []
        for d, a in columns:
            vals = []
            for r in rows:
                top = central.get((d, a, r["seed"]))
                if (row_label(r) == label and r["dataset"] == d and r["alpha"] == a
                        and r.get(metric) is not None and top is not None
                        and r.get("majority-rate") is not None):
                    g = gap_closed(r[metric], r["majority-rate"], top)
                    if g is not None:
                        vals.append(g)
            cells.append(_fmt(vals))
        lines.append(f"| {group} | {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def paper_tables(rows: list[dict[str, Any]], views: tuple[str, ...] = tuple(VIEWS)) -> str:
    """Every N, every view: the Markdown of ``tables.md`` (without its preamble).

    After the paper's metric comes the share of the majority-class -> central gap that each
    method closes (:func:`gap_table`).
    """
    parts = []
    for n in sorted({r["num-clients"] for r in rows}):
        for view in views:
            parts.append(f"### N = {n}: {VIEWS[view]}, accuracy %\n\n"
                         f"{paper_table(rows, n, view)}\n")
            if view == "official-after":
                parts.append(f"### N = {n}: share of the gap from the majority-class rate to "
                             f"`central` closed (official test, after personalization), %\n\n"
                             f"{gap_table(rows, n, view)}\n")
    return "\n".join(parts)


# Knowledge-flow columns of cells.csv (harness.collect.KNOWLEDGE), in the order the knowledge
# travels: teacher -> start of the student -> received model -> personalized model.
FLOW = (("teacher-acc", "teacher ceiling"), ("start-acc", "start"),
        ("received-acc", "received"), ("after-acc", "after personalization"))


def retention_table(rows: list[dict[str, Any]], dataset: str, alpha: float,
                    num_clients: int) -> str:
    """Where the knowledge goes in one column, for every distilling row (mean ± std over seeds).

    Per row: the accuracy of the teacher it distils from (FedBiCross: each cluster's mixture
    of ensembles under its final cross-cluster weights; the one-model methods: the ensemble of
    all clients), of the student's start (the cluster average with
    ``student-init='cluster-average'``; none from a random start), of the received model and
    of the model after personalization, all on the official test split; then retention =
    received / teacher, and the student's agreement with its teacher on the final synthetic
    images. Empty when no row of the column has a ``knowledge.json``.
    """
    rows = [r for r in rows if r["dataset"] == dataset and r["alpha"] == alpha
            and r["num-clients"] == num_clients and r.get("teacher-acc") is not None]
    if not rows:
        return ""
    lines = ["| method | " + " | ".join(name for _, name in FLOW)
             + " | retention | agreement on synthetic |", "|---|" + "---|" * (len(FLOW) + 2)]
    for _, label in _order(rows):
        mine = [r for r in rows if row_label(r) == label]
        cells = [_fmt([r[key] for r in mine if r.get(key) is not None]) for key, _ in FLOW]
        kept = [r["received-acc"] / r["teacher-acc"] for r in mine
                if r.get("received-acc") is not None and r["teacher-acc"]]
        cells.append(_fmt(kept))
        cells.append(_fmt([r["agreement-synthetic"] for r in mine
                           if r.get("agreement-synthetic") is not None]))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def per_column(rows: list[dict[str, Any]],
               table: Callable[[list[dict[str, Any]], str, float, int], str], title: str) -> str:
    """``table(rows, dataset, alpha, N)`` for every (N, dataset, alpha) column that has one.

    Each table comes under a heading ``N = .., <dataset> α=..: <title>``.
    """
    parts = []
    columns = list(dict.fromkeys((r["num-clients"], r["dataset"], r["alpha"]) for r in rows))
    for n, d, a in columns:
        text = table(rows, d, a, n)
        if text:
            parts.append(f"### N = {n}, {d} α={a:g}: {title}\n\n{text}\n")
    return "\n".join(parts)


def retention_tables(rows: list[dict[str, Any]]) -> str:
    """:func:`retention_table` for every (N, dataset, alpha) column that has one."""
    return per_column(rows, retention_table, "where the knowledge goes (official test, %; "
                      "retention = received / teacher)")


def cost_table(rows: list[dict[str, Any]], dataset: str, alpha: float,
               num_clients: int) -> str:
    """Accuracy and cost side by side in one column, for every row (mean over seeds).

    Per row: the official test accuracy after personalization (mean ± std over seeds), the
    megabytes each client sent and received over the whole run, the model exchanges (round
    trips of a model: R rounds or one upload, plus the personalization round) and the server
    stage's seconds. Empty when no row of the column recorded its cost.
    """
    rows = [r for r in rows if r["dataset"] == dataset and r["alpha"] == alpha
            and r["num-clients"] == num_clients]
    if not any(r.get("bytes-up") is not None for r in rows):
        return ""

    def mean(values: list[float], scale: float, digits: int) -> str:
        return f"{scale * statistics.fmean(values):.{digits}f}" if values else "n/a"

    lines = ["| method | official after pers. | MB up per client | MB down per client | "
             "model exchanges | server s |", "|---|---|---|---|---|---|"]
    for _, label in _order(rows):
        mine = [r for r in rows if row_label(r) == label]
        got = {key: [r[key] for r in mine if r.get(key) is not None]
               for key in ("official-after", "bytes-up", "bytes-down", "model-exchanges",
                           "server-s")}
        lines.append(f"| {label} | {_fmt(got['official-after'])} | "
                     f"{mean(got['bytes-up'], 1e-6, 2)} | {mean(got['bytes-down'], 1e-6, 2)} | "
                     f"{mean(got['model-exchanges'], 1, 0)} | {mean(got['server-s'], 1, 0)} |")
    return "\n".join(lines)


def cost_tables(rows: list[dict[str, Any]]) -> str:
    """:func:`cost_table` for every (N, dataset, alpha) column that has one."""
    return per_column(rows, cost_table, "accuracy and cost")
