"""The ranking of the one-shot methods per grid column (part of tables.md)."""

from __future__ import annotations

from pathlib import Path

from fedbicross_flwr.experiments.harness.collect import read_cells_csv
from fedbicross_flwr.experiments.harness.ordering import ranking_tables
from fedbicross_flwr.experiments.harness.report import ranking_section

ROOT = Path(__file__).resolve().parent.parent


def _row(row, method, seed, acc, alpha=0.1, k=None):
    return {"dataset": "digits", "alpha": alpha, "num-clients": 5, "num-clusters": k,
            "row": row, "method": method, "seed": seed, "official-after": acc}


def test_ranking_hand_computed():
    # Prepare: FedBiCross wins seed 0 against fedavg1 and loses seed 1; dense is best
    rows = [_row("fedavg1", "fedavg1", 0, 0.30), _row("fedavg1", "fedavg1", 1, 0.50),
            _row("dense", "dense", 0, 0.60), _row("dense", "dense", 1, 0.60),
            _row("fedbicross", "fedbicross", 0, 0.40, k=2),
            _row("fedbicross", "fedbicross", 1, 0.20, k=2),
            _row("intra-cluster", "fedbicross", 0, 0.35),
            _row("central", "central", 0, 0.99)]
    # Execute
    lines = ranking_tables(rows).splitlines()
    # Assert: means 60 / 40 / 30; rank 3 of 3; -30 to dense, -10 to fedavg1; central and the
    # ablation are not one-shot methods; the ablation table lists intra-cluster
    assert lines[2] == ("| digits α=0.1 N=5 | dense 60.00, fedavg1 40.00, fedbicross (K=2) "
                        "30.00 | 3 of 3 | -30.00 (dense) | -10.00 | fedavg1 1/2, dense 0/2 |")
    assert lines[-1] == "| digits α=0.1 N=5 | fedbicross (K=2) 30.00 | intra-cluster 35.00 |"


def test_no_fedbicross_rows_no_section():
    rows = [_row("fedavg1", "fedavg1", 0, 0.30)]
    assert ranking_tables(rows) == "" and ranking_section(rows) == []


def test_cpu_grid_ranking_matches_results_doc():
    # The table quoted in docs/RESULTS.md comes from the committed cells.csv
    tables = ranking_tables(read_cells_csv(ROOT / "docs" / "results" / "grid-cpu" / "cells.csv"))
    results = (ROOT / "docs" / "RESULTS.md").read_text()
    assert tables in results
