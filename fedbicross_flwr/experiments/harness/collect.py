"""One CSV row per finished cell, read back from the cells' ``summary.json`` (accuracies, and
what the method cost: bytes per client, model exchanges, server seconds) and, for the
distilling methods, ``knowledge.json`` (where the knowledge goes, official test split).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fedbicross_flwr.experiments.harness.runner import run_dir_of
from fedbicross_flwr.experiments.harness.spec import GridSpec
from fedbicross_flwr.reports.results import read_summary
from fedbicross_flwr.storage.atomic import open_text

# summary.json key -> CSV column (accuracies as fractions in [0, 1])
METRICS = {
    "local-test-acc-mean": "official-local",
    "acc-before-mean": "official-before",
    "acc-after-mean": "official-after",
    "local-test-acc-personal-mean": "personal-local",
    "acc-personal-before-mean": "personal-before",
    "acc-personal-after-mean": "personal-after",
    "majority-rate": "majority-rate",
}
# knowledge.json "stages" key -> CSV column (client-weighted means over the clusters)
KNOWLEDGE = {
    "all-client-ensemble-acc": "ensemble-acc",
    "teacher-acc": "teacher-acc",
    "start-acc": "start-acc",
    "received-acc": "received-acc",
    "after-acc": "after-acc",
    "agreement-synthetic": "agreement-synthetic",
}
# summary.json "cost" key -> CSV column (what the method cost each client, over the run)
COST = {
    "bytes-up-per-client": "bytes-up",
    "bytes-down-per-client": "bytes-down",
    "model-exchanges": "model-exchanges",
}
COLUMNS = ["dataset", "alpha", "num-clients", "num-clusters", "row", "method", "seed",
           *METRICS.values(), *KNOWLEDGE.values(), "clients-completed", "wall-s",
           "server-s", *COST.values(), "run-dir"]


def cell_rows(spec: GridSpec, out_dir: Path) -> list[dict[str, Any]]:
    """The finished cells of ``spec`` (unfinished ones are left out)."""
    rows = []
    for cell in spec.cells():
        run_dir = run_dir_of(out_dir, cell)
        summary = read_summary(run_dir)
        if summary is None:  # not finished
            continue
        times = summary.get("wall-times-s") or {}
        knowledge_path = run_dir / "knowledge.json"
        stages = (json.loads(knowledge_path.read_text()).get("stages") or {}
                  if knowledge_path.is_file() else {})
        rows.append({
            "dataset": cell.dataset, "alpha": cell.alpha, "num-clients": cell.num_clients,
            "num-clusters": "" if cell.num_clusters is None else cell.num_clusters,
            "row": cell.row, "method": spec.row(cell.row).method, "seed": cell.seed,
            **{col: summary.get(key) for key, col in METRICS.items()},
            **{col: stages.get(key) for key, col in KNOWLEDGE.items()},
            "clients-completed": summary.get("num-completed"),
            "wall-s": round(sum(float(v) for v in times.values()), 1) if times else None,
            "server-s": times.get("phase2-server-method"),
            **{col: (summary.get("cost") or {}).get(key) for key, col in COST.items()},
            "run-dir": str(run_dir.relative_to(out_dir)),
        })
    return rows


def write_cells_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``cells.csv``: every finished cell; an unknown value is an empty cell."""
    with open_text(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    return path


def read_cells_csv(path: Path) -> list[dict[str, Any]]:
    """Back from ``cells.csv``: numbers as numbers, empty cells as None."""
    ints = {"num-clients", "num-clusters", "seed", "clients-completed"}
    floats = {"alpha", "wall-s", "server-s", *METRICS.values(), *KNOWLEDGE.values(),
              *COST.values()}
    out = []
    with path.open() as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if v == "":
                    row[k] = None
                elif k in ints:
                    row[k] = int(float(v))
                elif k in floats:
                    row[k] = float(v)
                else:
                    row[k] = v
            out.append(row)
    return out
