"""Experiment harness: presets, resuming, the CSV, the paper-layout tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedbicross_flwr.transports.direct as direct
from fedbicross_flwr.config.run_config import ConfigError
from fedbicross_flwr.experiments.harness.collect import read_cells_csv
from fedbicross_flwr.experiments.harness.report import write_report
from fedbicross_flwr.experiments.harness.runner import (
    default_cell_runner,
    direct_transports,
    is_finished,
    run_dir_of,
    run_grid,
)
from fedbicross_flwr.experiments.harness.spec import load_grid_preset
from fedbicross_flwr.experiments.harness.tables import (
    gap_closed,
    gap_table,
    paper_table,
    retention_table,
)

ROOT = Path(__file__).resolve().parent.parent


def _preset(tmp_path: Path, archive: Path, body: str) -> Path:
    path = tmp_path / "grid-test.toml"
    path.write_text(body + f"""
[run-config]
data-path = "{archive}"
in-channels = 1
num-classes = 3
min-partition-size = 5
local-epochs = 1
pers-epochs = 1
batch-size = 16
local-lr = 0.01
progress = false
node-wait-timeout = 0.0
""")
    return path


FAKE_GRID = """
[grid]
datasets = ["custom"]
alphas = [0.5, 1.0]
num-clients = [3]
num-clusters = [2, 3]
seeds = [0]
methods = ["local", "fedavg1", "fedbicross"]
k-rows = ["fedbicross"]
"""


def _fake_summary(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"acc-after-mean": 0.5}))


def test_grid_resumes_without_rerunning_finished_cells(tiny_archive, tmp_path) -> None:
    # Prepare: 2 alphas x (local, fedavg1, fedbicross at K=2 and K=3) = 8 cells
    spec = load_grid_preset(_preset(tmp_path, tiny_archive, FAKE_GRID))
    cells = spec.cells()
    assert len(cells) == 8
    out = tmp_path / "grid"
    calls, transports = [], []

    def make_transport(cfg):
        transports.append(cfg.alpha)
        return object()

    def crashing(cell, cfg, transport):  # the first invocation stops after 3 cells
        if len(calls) >= 3:
            raise RuntimeError("machine went away")
        calls.append(cell)
        _fake_summary(Path(cfg.output_dir) / cfg.run_name)
        return Path(cfg.output_dir) / cfg.run_name

    # Execute 1: 3 cells finish, 5 fail
    first = run_grid(spec, out, make_transport, crashing)
    assert len(first.ran) == 3 and len(first.failed) == 5
    assert [is_finished(out, c) for c in cells] == [True] * 3 + [False] * 5
    assert (out / "failed_cells.txt").read_text().count("machine went away") == 5
    # Execute 2: only the 5 unfinished cells run, each once; one transport per alpha
    calls.clear()
    transports.clear()

    def counting(cell, cfg, transport):
        calls.append(cell)
        _fake_summary(Path(cfg.output_dir) / cfg.run_name)
        return Path(cfg.output_dir) / cfg.run_name

    second = run_grid(spec, out, make_transport, counting)
    assert calls == cells[3:] and second.skipped == 3
    assert transports == [0.5, 1.0]
    # Execute 3: nothing left
    calls.clear()
    third = run_grid(spec, out, make_transport, counting)
    assert calls == [] and third.skipped == 8 and not third.ran


def test_a_group_whose_clients_cannot_be_set_up_fails_and_the_grid_goes_on(tiny_archive,
                                                                           tmp_path) -> None:
    # Prepare: the clients of alpha 0.5 cannot be built (e.g. an infeasible partition)
    spec = load_grid_preset(_preset(tmp_path, tiny_archive, FAKE_GRID))
    out, built, ran = tmp_path / "grid", [], []

    def make_transport(cfg):
        built.append(cfg.alpha)
        if cfg.alpha == 0.5:
            raise ValueError("Dirichlet partition failed")
        return object()

    def runner(cell, cfg, transport):
        ran.append(cell.alpha)
        _fake_summary(Path(cfg.output_dir) / cfg.run_name)
        return Path(cfg.output_dir) / cfg.run_name

    # Execute
    progress = run_grid(spec, out, make_transport, runner)
    # Assert: the 4 alpha-0.5 cells fail with the reason (one setup attempt), alpha 1.0 runs
    assert built == [0.5, 1.0]
    assert ran == [1.0] * 4 and len(progress.failed) == 4
    assert all(c.alpha == 0.5 for c, _ in progress.failed)
    assert (out / "failed_cells.txt").read_text().count("Dirichlet partition failed") == 4


def test_one_real_cell_runs_once_and_is_reported(tiny_archive, tmp_path, monkeypatch) -> None:
    # Prepare: a grid of one real cell (3 clients, `local`)
    spec = load_grid_preset(_preset(tmp_path, tiny_archive, """
[grid]
datasets = ["custom"]
alphas = [1.0]
num-clients = [3]
seeds = [0]
methods = ["local"]
"""))
    out = tmp_path / "grid"
    trained, ran = [], []
    real_train = direct.run_local_training
    monkeypatch.setattr(direct, "run_local_training",
                        lambda *a, **k: trained.append(1) or real_train(*a, **k))

    def counting(cell, cfg, transport):
        ran.append(cell)
        return default_cell_runner(cell, cfg, transport)

    # Execute: twice
    run_grid(spec, out, direct_transports(tmp_path / "cache"), counting)
    run_grid(spec, out, direct_transports(tmp_path / "cache"), counting)
    report = write_report(spec, out)
    # Assert: the cell ran once, its 3 clients were trained once
    assert len(ran) == 1 and len(trained) == 3
    cell = spec.cells()[0]
    summary = json.loads((run_dir_of(out, cell) / "summary.json").read_text())
    rows = read_cells_csv(out / "cells.csv")
    assert len(rows) == 1
    assert rows[0]["row"] == "local" and rows[0]["seed"] == 0 and rows[0]["alpha"] == 1.0
    assert rows[0]["official-after"] == pytest.approx(summary["acc-after-mean"])
    assert rows[0]["run-dir"] == "runs/custom/a1-n3-s0/local"
    assert "| reference | local |" in report.read_text()


GOLDEN_CSV = """\
dataset,alpha,num-clients,num-clusters,row,method,seed,official-local,official-before,official-after,personal-local,personal-before,personal-after,majority-rate,clients-completed,wall-s,run-dir
digits,0.1,5,,fedavg1,fedavg1,0,0.4,0.3,0.5,0.9,0.3,0.9,0.1019,5,10.0,a
digits,0.1,5,,fedavg1,fedavg1,1,0.4,0.3,0.6,0.9,0.3,0.9,0.1019,5,10.0,b
digits,0.1,5,2,fedbicross,fedbicross,0,0.4,0.3,0.7,0.9,0.3,0.9,0.1019,5,10.0,c
digits,0.1,5,2,fedbicross,fedbicross,1,0.4,0.3,0.8,0.9,0.3,0.9,0.1019,5,10.0,d
digits,0.1,5,,intra-cluster,fedbicross,0,0.4,0.3,0.65,0.9,0.3,0.9,0.1019,5,10.0,e
digits,0.5,5,,fedavg1,fedavg1,0,0.4,0.3,0.9,0.9,0.3,0.9,0.1019,5,10.0,f
digits,0.5,5,,fedavg1,fedavg1,1,0.4,0.3,0.9,0.9,0.3,0.9,0.1019,5,10.0,g
digits,0.1,5,,central,central,0,0.4,0.3,0.95,0.9,0.3,0.9,0.1019,5,10.0,h
digits,0.1,5,,central,central,1,0.4,0.3,0.97,0.9,0.3,0.9,0.1019,5,10.0,i
digits,0.5,5,,central,central,0,0.4,0.3,0.98,0.9,0.3,0.9,0.1019,5,10.0,j
digits,0.5,5,,central,central,1,0.4,0.3,0.98,0.9,0.3,0.9,0.1019,5,10.0,k
retinamnist,0.1,5,,fedavg1,fedavg1,0,0.4,0.3,0.435,0.9,0.3,0.9,0.435,5,10.0,l
digits,0.1,10,,fedavg1,fedavg1,0,0.4,0.3,0.1,0.9,0.3,0.9,0.1019,5,10.0,m
"""

GOLDEN_TABLE = """\
| group | method | digits α=0.1 | digits α=0.5 | retinamnist α=0.1 |
|---|---|---|---|---|
| baseline | fedavg1 | 55.00 ± 7.07 | 90.00 ± 0.00 | 43.50 (1 seed) |
| ours | fedbicross (K=2) | 75.00 ± 7.07 | - | - |
| ablation | intra-cluster | 65.00 (1 seed) | - | - |
| reference | central | 96.00 ± 1.41 | 98.00 ± 0.00 | - |
| reference | majority class | 10.19 | 10.19 | 43.50 |"""


def test_table_writer_produces_the_paper_layout(tmp_path) -> None:
    # Prepare: a hand-written CSV (rows deliberately out of order; an N=10 row to leave out)
    path = tmp_path / "cells.csv"
    path.write_text(GOLDEN_CSV)
    # Execute
    table = paper_table(read_cells_csv(path), num_clients=5)
    # Assert: methods as rows in the paper's groups, dataset x alpha as columns, mean ± std
    assert table == GOLDEN_TABLE


def test_gap_table_is_the_share_of_the_majority_to_central_gap(tmp_path) -> None:
    # Prepare
    path = tmp_path / "cells.csv"
    path.write_text(GOLDEN_CSV)

    def gap(v: float, c: float) -> float:  # hand formula, majority 0.1019 in every digits row
        return 100 * (v - 0.1019) / (c - 0.1019)

    fedavg1 = [gap(0.5, 0.95), gap(0.6, 0.97)]  # seed 0 against central seed 0, seed 1 vs 1
    mean = sum(fedavg1) / 2
    std = abs(fedavg1[0] - fedavg1[1]) / 2 ** 0.5  # sample std of two values
    # Execute
    table = gap_table(read_cells_csv(path), num_clients=5).splitlines()
    # Assert
    assert table[0] == "| group | method | digits α=0.1 | digits α=0.5 | retinamnist α=0.1 |"
    assert table[2] == (f"| baseline | fedavg1 | {mean:.2f} ± {std:.2f} | "
                        f"{gap(0.9, 0.98):.2f} ± 0.00 | - |")
    assert table[4] == f"| ablation | intra-cluster | {gap(0.65, 0.95):.2f} (1 seed) | - | - |"
    assert not any("central" in line for line in table)  # 100 % by definition
    assert gap_closed(0.3, 0.4, 0.35) is None  # central below the majority rate: no gap
    assert gap_closed(0.5, 0.435, 0.44) is None  # within a point of it: no meaningful ratio
    assert gap_closed(0.5, 0.435, 0.45) == pytest.approx((0.5 - 0.435) / (0.45 - 0.435))


FLOW_CSV = """\
dataset,alpha,num-clients,num-clusters,row,method,seed,official-after,teacher-acc,start-acc,received-acc,after-acc,agreement-synthetic
digits,0.1,5,2,fedbicross,fedbicross,0,0.7,0.6,,0.3,0.7,0.9
digits,0.1,5,2,fedbicross,fedbicross,1,0.8,0.5,,0.4,0.8,0.8
digits,0.1,5,,dense,dense,0,0.5,0.4,0.2,0.1,0.5,
digits,0.1,5,,fedavg1,fedavg1,0,0.5,,,,,
digits,0.5,5,,dense,dense,0,0.5,0.9,,0.9,0.9,
"""


def test_retention_table_follows_the_knowledge_from_teacher_to_personalized(tmp_path) -> None:
    path = tmp_path / "cells.csv"
    path.write_text(FLOW_CSV)
    lines = retention_table(read_cells_csv(path), "digits", 0.1, 5).splitlines()
    assert lines[0] == ("| method | teacher ceiling | start | received | after personalization "
                        "| retention | agreement on synthetic |")
    kept = [0.3 / 0.6, 0.4 / 0.5]  # received / teacher per seed, then mean ± sample std
    mean, std = 50 * (kept[0] + kept[1]), 100 * abs(kept[0] - kept[1]) / 2 ** 0.5
    assert lines[2] == "| dense | 40.00 (1 seed) | 20.00 (1 seed) | 10.00 (1 seed) | " \
                       "50.00 (1 seed) | 25.00 (1 seed) | - |"
    assert lines[3] == (f"| fedbicross (K=2) | 55.00 ± 7.07 | - | 35.00 ± 7.07 | 75.00 ± 7.07 | "
                        f"{mean:.2f} ± {std:.2f} | 85.00 ± 7.07 |")
    assert len(lines) == 4  # fedavg1 distils nothing: no row
    assert retention_table(read_cells_csv(path), "retinamnist", 0.1, 5) == ""


@pytest.mark.parametrize("preset", sorted((ROOT / "conf").glob("grid-*.toml")),
                         ids=lambda p: p.stem)
def test_grid_presets_are_valid(preset: Path) -> None:
    spec = load_grid_preset(preset)  # validates every cell's run config
    assert spec.cells()
    # every grid has the one-shot references and the central upper bound; the grids at the
    # paper's main federation (N = 5) also the multi-round reference (at N = 10, 20 it would
    # retrain every client for each round, longer than the rest of the grid)
    required = {"local", "fedavg1", "fedbicross", "central"}
    if 5 in {c.num_clients for c in spec.cells()}:
        required.add("fedavg-r")
    assert required <= {r.name for r in spec.rows}
    # every group of clients on the bundled digits can be partitioned (a grid must not fail
    # all its cells at set-up): flwr-datasets' Dirichlet draw meets min-partition-size
    from fedbicross_flwr.data.datasets import load_digits_dataset
    from fedbicross_flwr.data.partition import dirichlet_partition

    labels = load_digits_dataset().train.labels.reshape(-1).astype(np.int64)
    for cell in {c.group_dir: c for c in spec.cells() if c.dataset == "digits"}.values():
        cfg = spec.run_config(cell, ROOT / "unused")  # nothing is written
        parts = dirichlet_partition(labels, cfg.num_clients, cfg.alpha, cfg.seed,
                                    cfg.min_partition_size)
        assert min(len(p) for p in parts) >= cfg.min_partition_size, cell.group_dir


def test_bad_grid_preset_names_the_key_and_the_cell(tiny_archive, tmp_path) -> None:
    bad_key = _preset(tmp_path, tiny_archive, FAKE_GRID.replace("seeds", "seedz"))
    with pytest.raises(ConfigError, match="seedz"):
        load_grid_preset(bad_key)
    bad_value = _preset(tmp_path, tiny_archive, FAKE_GRID + """
[[rows]]
name = "bad"
method = "fedbicross"
run-config = { weights-mode = "nonsense" }
""")
    with pytest.raises(ConfigError, match=r"cell custom alpha=0\.5 N=3 bad seed=0: "
                                          r"run-config key 'weights-mode'"):
        load_grid_preset(bad_value)


def test_grid_can_be_narrowed_to_one_column_and_other_seeds() -> None:
    from fedbicross_flwr.experiments.harness.cli import narrowed

    spec = load_grid_preset(ROOT / "conf" / "grid-cpu.toml")
    one = narrowed(spec, "digits", "0.1", "0,1,2")
    cells = one.cells()
    assert {(c.dataset, c.alpha) for c in cells} == {("digits", 0.1)}
    assert {c.seed for c in cells} == {0, 1, 2}
    # every row of that column is kept, the ablations included
    assert {c.row for c in cells} == {c.row for c in spec.cells()
                                      if (c.dataset, c.alpha) == ("digits", 0.1)}
    assert narrowed(spec, "", "", "") is spec
    assert {c.row for c in narrowed(spec, "digits", "0.1", "", "fedavg1,central").cells()} == {
        "fedavg1", "central"}
    for bad, match in ((("cifar10", "", ""), "cifar10"), (("", "0.3", ""), "0.3"),
                       (("", "", "1,x"), "integers"), (("", "", "", "fedavg9"), "fedavg9")):
        with pytest.raises(ConfigError, match=match):
            narrowed(spec, *bad)


def test_grid_run_config_overrides_reach_every_cell_and_per_cell_keys_are_refused(
        tmp_path) -> None:
    from fedbicross_flwr.experiments.harness.cli import with_overrides

    spec = load_grid_preset(ROOT / "conf" / "grid-cpu.toml")
    changed = with_overrides(spec, "pers-epochs=1 pers-lr=0.005")
    cell = changed.cells()[0]
    cfg = changed.run_config(cell, tmp_path)
    assert (cfg.pers_epochs, cfg.pers_lr) == (1, 0.005)
    assert spec.run_config(cell, tmp_path).pers_epochs == 10  # the preset is not changed
    assert with_overrides(spec, "") is spec
    with pytest.raises(ConfigError, match="seed"):
        with_overrides(spec, "seed=3")
    with pytest.raises(ConfigError, match="pers-lr"):
        with_overrides(spec, "pers-lr=-1")


COST_CSV = """\
dataset,alpha,num-clients,num-clusters,row,method,seed,official-after,server-s,bytes-up,bytes-down,model-exchanges
digits,0.1,5,2,fedbicross,fedbicross,0,0.5,300.4,2000000,4000000,2
digits,0.1,5,2,fedbicross,fedbicross,1,0.7,301.6,2000000,4000000,2
digits,0.1,5,,fedavg-r,fedavg-r,0,0.6,2.0,20000000,22000000,11
digits,0.1,5,,local,local,0,0.3,,,,
"""


def test_cost_table_puts_accuracy_and_cost_side_by_side(tmp_path) -> None:
    from fedbicross_flwr.experiments.harness.tables import cost_table

    path = tmp_path / "cells.csv"
    path.write_text(COST_CSV)
    lines = cost_table(read_cells_csv(path), "digits", 0.1, 5).splitlines()
    assert lines[0] == ("| method | official after pers. | MB up per client | MB down per client "
                        "| model exchanges | server s |")
    body = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert body["fedbicross (K=2)"] == "| fedbicross (K=2) | 60.00 ± 14.14 | 2.00 | 4.00 | 2 | 301 |"
    assert body["fedavg-r"] == "| fedavg-r | 60.00 (1 seed) | 20.00 | 22.00 | 11 | 2 |"
    assert body["local"] == "| local | 30.00 (1 seed) | n/a | n/a | n/a | n/a |"
    assert cost_table(read_cells_csv(path), "digits", 0.5, 5) == ""


@pytest.mark.parametrize("preset", sorted((ROOT / "conf").glob("grid-*.toml")),
                         ids=lambda p: p.stem)
def test_fedisca_runs_at_fedbicross_budget_in_every_grid(preset: Path) -> None:
    # FedISCA and FedBiCross share the synthesis: every comparison gives them the same server
    # epochs E, trajectory length T, synthesis batch B and KD batch.
    spec = load_grid_preset(preset)
    cells = spec.cells()
    budgets: dict[str, set] = {}
    for cell in cells:
        if cell.row not in ("fedisca", "fedbicross"):
            continue
        cfg = spec.run_config(cell, ROOT / "unused")
        epochs = (cfg.fedisca_epochs or cfg.server_epochs) if cell.row == "fedisca" \
            else cfg.server_epochs
        budgets.setdefault(cell.group_dir, set()).add(
            (epochs, cfg.synth_steps, cfg.synth_batch, cfg.kd_batch or cfg.synth_batch))
    assert budgets and all(len(b) == 1 for b in budgets.values()), budgets


def test_paper_table_puts_the_papers_bloodmnist_numbers_beside_ours() -> None:
    from fedbicross_flwr.experiments.harness.tables import paper_table

    rows = [{"dataset": "bloodmnist-pbc", "alpha": 0.1, "num-clients": 5, "row": r,
             "num-clusters": k, "method": r, "seed": 0, "official-after": v,
             "official-before": v / 2, "majority-rate": 0.1947}
            for r, k, v in (("fedisca", None, 0.40), ("fedbicross", 2, 0.50),
                            ("local", None, 0.30))]
    after = paper_table(rows, 5).splitlines()
    assert "| baseline | fedisca | 40.00 (1 seed) [paper 48.49] |" in after
    assert "| ours | fedbicross (K=2) | 50.00 (1 seed) [paper 84.94] |" in after
    assert "| reference | local | 30.00 (1 seed) |" in after  # not in the paper
    before = paper_table(rows, 5, "official-before").splitlines()
    assert "| ours | fedbicross (K=2) | 25.00 (1 seed) [paper 77.69] |" in before
    assert "[paper" not in paper_table([dict(r, **{"num-clients": 10}) for r in rows], 10)
