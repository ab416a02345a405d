"""Several methods in one run: the comparison table, the summary picture, the run position."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from fedbicross_flwr.config.run_config import ConfigError, RunConfig, load_preset
from fedbicross_flwr.fedbicross.method import algorithm_stages
from fedbicross_flwr.logging_utils import Cadence, StagePlan, position_text, run_position
from fedbicross_flwr.reports.comparison import comparison_markdown, comparison_rows
from fedbicross_flwr.reports.summary_figure import read_weight_history, summary_figure
from fedbicross_flwr.runners.direct import run_direct_methods

ROOT = Path(__file__).resolve().parent.parent


def _summary(path: Path, method: str, before: float, after: float, **more) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({**more,
        "method": method, "dataset": "digits", "num-completed": 5, "num-clients": 5,
        "acc-before-mean": before, "acc-after-mean": after,
        "acc-personal-before-mean": before / 2, "acc-personal-after-mean": None,
        "local-test-acc-mean": 0.25, "local-test-acc-personal-mean": 0.5,
        "majority-rate": 0.1017}))
    return path


def test_comparison_table_hand_computed(tmp_path) -> None:
    # Prepare: two methods' summary.json
    dirs = {"local": _summary(tmp_path / "a", "local", 0.25, 0.3),
            "fedbicross": _summary(tmp_path / "b", "fedbicross", 0.4012, 0.45678, cost={
                "bytes-up-per-client": 2_846_000, "bytes-down-per-client": 5_690_123,
                "model-exchanges": 2, "server-seconds": 373.4}, **{
                "scored-by": "server", "acc-after-median": 0.5, "acc-after-outliers": [],
                "acc-after-per-site": {"0": 0.37034, "1": 0.5, "2": 0.5}})}
    # Execute
    table = comparison_markdown(comparison_rows(dirs))
    # Assert: percentages with 2 decimals, missing as n/a, rows in the order given
    lines = table.splitlines()
    assert lines[2] == ("| local | 5/5 | n/a | 25.00 | **30.00** | n/a | 12.50 | n/a | n/a | n/a "
                        "| n/a | n/a |")
    assert lines[3] == ("| fedbicross | 5/5 | server | 40.12 | **45.68** | 50.00 | 20.06 | n/a "
                        "| 2.85 | 5.69 | 2 | 373 |")
    assert lines[5] == ("Mean client accuracy (%) on digits. Majority-class rate of the official "
                        "test split: 10.17. The clients' own models before any server method: "
                        "official 25.00, label-following 50.00.")
    assert lines[7:] == ["Per site, official test after personalization (%):", "- local: n/a",
                         "- fedbicross: 0: 37.03, 1: 50.00, 2: 50.00"]


def test_methods_key_is_validated() -> None:
    from fedbicross_flwr.methods.catalog import method_names, method_spec

    assert method_names(kind="multi-round")[:2] == ("fedavg-r", "fedprox-r")  # the catalog
    assert [method_spec(m).strategy for m in method_names(kind="multi-round")][:2] == [
        "FedAvg", "FedProx"]
    assert RunConfig(methods=" local, fedbicross ").method_list == ["local", "fedbicross"]
    assert RunConfig(method="central").method_list == ["central"]
    assert RunConfig(methods="local,fedavg-r").method_list == ["local", "fedavg-r"]
    with pytest.raises(ConfigError, match="unknown method 'fedbicros'"):
        RunConfig(methods="local,fedbicros")
    with pytest.raises(ConfigError, match="twice"):
        RunConfig(methods="local,local")
    # any number of multi-round methods, anywhere in the list
    assert RunConfig(methods="fedavg-r,krum-r,fedavg1").method_list == [
        "fedavg-r", "krum-r", "fedavg1"]


def test_quickstart_preset_is_the_cpu_preset_on_digits_with_the_null_row() -> None:
    quick, cpu = load_preset(ROOT / "conf/quickstart.toml"), load_preset(ROOT / "conf/cpu.toml")
    assert quick.pop("dataset") == "digits"
    assert quick.pop("methods") == "local,fedavg1,cluster-fedavg,fedbicross"
    # the three deviations its header names (the 5-minute budget), and no other value drifts
    assert (quick.pop("model-width"), quick.pop("synth-steps"), quick.pop("eval-precision")) \
        == (16, 100, "auto")
    assert cpu["synth-steps"] == 200 and "model-width" not in cpu
    assert quick == {k: v for k, v in cpu.items() if k in quick}
    RunConfig.from_run_config(load_preset(ROOT / "conf/quickstart.toml"))


def test_algorithm_stages_and_run_position(caplog) -> None:
    # Algorithm 1 with K=2 clusters, one server epoch: 6 stages
    names = algorithm_stages(2, 1)
    assert names == ["Stage 1a clustering", "Stage 1b synthesis, cluster 0",
                     "Stage 1c noise adaptation, cluster 0", "Stage 1b synthesis, cluster 1",
                     "Stage 1c noise adaptation, cluster 1", "Stage 2 bi-level cross-cluster KD"]
    assert len(algorithm_stages(3, 2)) == 1 + 2 * (2 * 3 + 1)
    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError):
        with run_position("method 2/3 fedbicross"):
            plan = StagePlan(names)
            plan.begin(names[3])
            assert position_text() == ("[method 2/3 fedbicross | stage 4/6 Stage 1b synthesis, "
                                       "cluster 1] ")
            raise RuntimeError("a stage fails")
    assert position_text() == ""  # the failed stage's label went with the method's
    assert "[method 2/3 fedbicross] stage 4 of 6: Stage 1b synthesis, cluster 1" in caplog.text


def test_a_failed_run_leaves_no_stage_in_the_position() -> None:
    from fedbicross_flwr.logging_utils import keeps_position

    @keeps_position
    def failing_run() -> None:
        StagePlan(["a", "b"]).begin("b")
        assert position_text() == "[stage 2/2 b] "
        raise RuntimeError("a stage fails")

    with pytest.raises(RuntimeError):
        failing_run()
    assert position_text() == ""


def test_cadence_every_tenth_and_every_30_seconds(monkeypatch) -> None:
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 42.0])
    monkeypatch.setattr("fedbicross_flwr.logging_utils.time.perf_counter", lambda: next(clock))
    cadence = Cadence(100)  # created at t=0: every 10 steps, or 30 s after the last line
    assert [cadence.due(s) for s in (3, 10, 11, 12, 13)] == [False, True, True, False, False]
    # step 11 at t=40 is 38 s after step 10's line at t=2


def test_three_methods_write_the_comparison_and_the_summary_picture(tiny_run_config) -> None:
    # Prepare: a seconds-sized run with FedBiCross (2 clusters, 3 synthesis steps)
    cfg = RunConfig.from_run_config({
        **tiny_run_config, "run-name": "cmp", "synth-steps": 3, "synth-batch": 6,
        "noise-samples": 8, "num-clusters": 2, "kmeans-n-init": 1})
    # Execute
    dirs = run_direct_methods(cfg, ["local", "fedavg1", "fedbicross"])
    # Assert: one folder per method plus the comparison, whose rows are the summaries
    out = dirs.pop("comparison")
    assert out.name == "cmp-comparison" and list(dirs) == ["local", "fedavg1", "fedbicross"]
    with (out / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["local", "fedavg1", "fedbicross"]
    for row, run_dir in zip(rows, dirs.values()):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert float(row["official-after"]) == summary["acc-after-mean"]
        assert float(row["label-following-received"]) == summary["acc-personal-before-mean"]
    assert "| fedbicross | 3/3 |" in (out / "comparison.md").read_text()
    # the picture: a real PNG, with the three panels drawn from the run's files
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, (acc, pics, weights) = summary_figure(comparison_rows(dirs), dirs["fedbicross"])
    assert len(fig.axes) == 3
    assert len(acc.patches) == 4 * 3  # 4 views x 3 methods
    assert len(pics.images) == 1 and pics.images[0].get_array().shape[0] == 2 * 28 + 1
    history = read_weight_history(dirs["fedbicross"] / "weights.csv")
    assert history.shape == (3, 2, 2) and len(weights.lines) == 4
    assert weights.lines[1].get_ydata()[-1] == pytest.approx(history[-1, 0, 1])
    # without FedBiCross the picture still has its three panels, two of them notes
    fig, (_, pics, weights) = summary_figure(comparison_rows({"local": dirs["local"]}), None)
    assert not pics.images and not weights.lines and len(fig.axes) == 3


def test_a_stopped_comparison_resumes_and_keeps_the_methods_it_finished(tmp_path) -> None:
    from fedbicross_flwr.runners.inprocess import run_in_process
    from tests.conftest import make_archive

    # Prepare: a finished two-method comparison, then the second method made unfinished
    run = {"dataset": "custom", "in-channels": 1, "num-classes": 3, "alpha": 100.0,
           "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1, "batch-size": 16,
           "local-lr": 0.01, "output-dir": str(tmp_path / "runs"), "run-name": "cmp",
           "progress": False, "node-wait-timeout": 0.0, "device": "cpu", "model-width": 8,
           "num-clients": 3, "methods": "local,fedavg1", "resume": True,
           "data-path": str(make_archive(tmp_path / "d.npz", n_train=90))}
    run_in_process(run, num_nodes=3)
    runs = tmp_path / "runs"
    kept = (runs / "cmp-local" / "summary.json").stat().st_mtime_ns
    (runs / "cmp-fedavg1" / "summary.json").unlink()  # stopped in fedavg1's phase 3
    # Execute: the same run with resume=true
    _, out = run_in_process(run, num_nodes=3)
    # Assert: local's finished folder is kept as it was, fedavg1 finishes, the table is written
    assert out == runs / "cmp-comparison" and (out / "comparison.md").is_file()
    assert (runs / "cmp-local" / "summary.json").stat().st_mtime_ns == kept
    assert (runs / "cmp-fedavg1" / "summary.json").is_file()
    assert not (runs / "cmp-local-1").exists() and not (runs / "cmp-fedavg1-1").exists()
