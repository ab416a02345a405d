"""The comparison of several server methods run on the same client uploads.

One row per method, read from each method's ``summary.json``: the mean client accuracy in the
official view (the paper's metric: the official test split) and in the label-following view
(a test set drawn like the client's own labels), on the received model (before
personalization) and after personalization, next to what the method cost: megabytes each
client sent and received over the run, model exchanges (round trips of a model), and the
server stage's seconds. The majority-class rate of the official test
split is the floor a useful model must beat.

Beside the paper's metric (the mean over the sites) stand its median over the sites and who
scored it (``scored-by``: the server, in a simulation, or the sites themselves, in a
deployment); below the table each method's per-site figures, a self-reported figure far from
the others marked (:mod:`fedbicross_flwr.reports.headline`).

``<run-name>-comparison/``
    ``comparison.csv``   the table, one row per method (fractions in [0, 1])
    ``comparison.md``    the same as Markdown (percentages), as logged and printed
    ``summary.png``      the summary picture (:mod:`fedbicross_flwr.reports.summary_figure`)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fedbicross_flwr.reports.headline import per_site_text
from fedbicross_flwr.reports.results import percent
from fedbicross_flwr.storage.atomic import open_text, write_text

# column -> key of summary.json
COLUMNS = {
    "official-received": "acc-before-mean",
    "official-after": "acc-after-mean",
    "official-after-median": "acc-after-median",
    "label-following-received": "acc-personal-before-mean",
    "label-following-after": "acc-personal-after-mean",
}


# cost column -> key of summary.json's "cost" (bytes per client each way, over the whole run)
COST = {
    "bytes-up-per-client": "bytes-up-per-client",
    "bytes-down-per-client": "bytes-down-per-client",
    "model-exchanges": "model-exchanges",
    "server-seconds": "server-seconds",
}


def comparison_rows(run_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per method (in the order given) from its run folder's ``summary.json``."""
    rows = []
    for method, run_dir in run_dirs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"method": method,
                     "clients": f"{summary['num-completed']}/{summary['num-clients']}",
                     "scored-by": summary.get("scored-by"),
                     **{col: summary.get(key) for col, key in COLUMNS.items()},
                     "local-official": summary.get("local-test-acc-mean"),
                     "local-label-following": summary.get("local-test-acc-personal-mean"),
                     "majority-rate": summary.get("majority-rate"),
                     **{col: (summary.get("cost") or {}).get(key) for col, key in COST.items()},
                     "official-after-per-site": summary.get("acc-after-per-site"),
                     "outlier-sites": summary.get("acc-after-outliers"),
                     "dataset": summary.get("dataset"), "run-dir": str(run_dir)})
    return rows


def _num(value: float | None, scale: float, digits: int) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown: accuracies in %, the paper's metric in bold beside its median
    over the sites; then each method's per-site figures.
    """
    lines = ["| method | clients | scored by | official: received | official: after pers. "
             "(paper metric) | median over sites | label-following: received "
             "| label-following: after pers. | MB up per client | MB down per client "
             "| model exchanges | server s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['clients']} | {r.get('scored-by') or 'n/a'} | "
                     f"{percent(r['official-received'])} | "
                     f"**{percent(r['official-after'])}** | "
                     f"{percent(r.get('official-after-median'))} | "
                     f"{percent(r['label-following-received'])} | "
                     f"{percent(r['label-following-after'])} | "
                     f"{_num(r.get('bytes-up-per-client'), 1e-6, 2)} | "
                     f"{_num(r.get('bytes-down-per-client'), 1e-6, 2)} | "
                     f"{_num(r.get('model-exchanges'), 1, 0)} | "
                     f"{_num(r.get('server-seconds'), 1, 0)} |")
    if rows:
        first = rows[0]
        lines += ["",
                  f"Mean client accuracy (%) on {first['dataset']}. Majority-class rate of the "
                  f"official test split: {percent(first['majority-rate'])}. The clients' own "
                  f"models before any server method: official {percent(first['local-official'])}, "
                  f"label-following {percent(first['local-label-following'])}.", "",
                  "Per site, official test after personalization (%):"]
        for r in rows:
            sites = per_site_text(r.get("official-after-per-site"), r.get("outlier-sites") or ())
            lines.append(f"- {r['method']}: {sites}")
    return "\n".join(lines)


def _cell(value: Any) -> Any:
    """A CSV cell: per-site figures as ``0=0.3333 1=0.5``, a list of sites as ``2 5``."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v:.4g}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(map(str, value))
    return value


def write_comparison(out_dir: Path, run_dirs: dict[str, Path]) -> str:
    """Write ``comparison.csv``, ``comparison.md`` and ``summary.png``; returns the Markdown.

    A picture that cannot be drawn (e.g. matplotlib missing) is logged, never fatal: the
    tables are already written.
    """
    import logging

    from fedbicross_flwr.logging_utils import log

    rows = comparison_rows(run_dirs)
    fields = ["method", "clients", "scored-by", *COLUMNS, "local-official",
              "local-label-following", "majority-rate", *COST, "official-after-per-site",
              "outlier-sites", "dataset", "run-dir"]
    with open_text(out_dir / "comparison.csv", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r[k] is None else _cell(r[k]) for k in fields})
    table = comparison_markdown(rows)
    write_text(out_dir / "comparison.md", table + "\n")
    try:
        from fedbicross_flwr.reports.summary_figure import write_summary_figure

        write_summary_figure(out_dir / "summary.png", rows, run_dirs)
    except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
        log(logging.WARNING, "summary picture not written: %s: %s", type(err).__name__, err)
    return table
