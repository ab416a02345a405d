"""``fedbicross bench --device-check`` on the CPU: the device check, the measured peak, the
per-width epochs with their estimate and time budget, the CSV and JSON, and its bad inputs.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fedbicross_flwr.cli import main
from fedbicross_flwr.experiments.benchmark.device_check import TINY_CHECK, compare_runs, tiny_run
from fedbicross_flwr.experiments.benchmark.device_report import (
    CSV_COLUMNS,
    MEASURED,
    SKIPPED,
    STAGES,
    estimate_epoch_s,
    probe_steps,
)
from fedbicross_flwr.experiments.benchmark.peak import TINY_SIZES, measure_peak, peak_for
from fedbicross_flwr.experiments.benchmark.server_stage import BenchConfig

TINY_CPU = ["bench", "--device-check", "--device", "cpu", "--tiny", "--dtype", "fp32"]


def _rows(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_tiny_cpu_run_checks_cpu_against_itself_and_writes_every_width_and_stage(tmp_path,
                                                                                 capsys):
    # Execute
    code = main([*TINY_CPU, "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    printed = capsys.readouterr().out
    # Assert: the CPU against itself agrees exactly in every comparison
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["check"]["passed"]
    assert len(report["check"]["checks"]) == 1 + 2 * 2 + 1  # assignment, 2 x K, weights
    assert all(row["error"] == 0.0 for row in report["check"]["checks"])
    assert "device check passed: True" in printed and "| width | stage |" in printed
    # the measured fp32 peak is what the stages are compared against
    assert report["peak"]["fp32"]["flops_per_s"] > 0
    # one row per width and stage, every one measured, with positive times and rates
    columns, rows = _rows(tmp_path / "r.csv")
    assert tuple(columns) == CSV_COLUMNS
    assert [(int(r["width"]), r["stage"]) for r in rows] == [(w, s) for w in (4, 8)
                                                            for s in STAGES]
    for row in rows:
        assert row["status"] == MEASURED and row["device"] == "cpu" and row["dtype"] == "fp32"
        assert float(row["epoch_s"]) > 0 and float(row["gflop_per_step"]) > 0
        assert float(row["achieved_tflop_per_s"]) > 0 and float(row["percent_of_peak"]) > 0
        assert float(row["peak_tflop_per_s"]) == pytest.approx(
            report["peak"]["fp32"]["flops_per_s"] / 1e12)
    # per width, the stages add up to the total
    for width in ("4", "8"):
        parts = [float(r["epoch_s"]) for r in rows if r["width"] == width]
        assert sum(parts[:-1]) == pytest.approx(parts[-1])


def test_a_width_whose_estimate_exceeds_the_budget_is_skipped(tmp_path, capsys):
    # Execute: a budget that the device check alone uses up
    code = main([*TINY_CPU, "--widths", "4", "--budget-s", "0.001", "--csv",
                 str(tmp_path / "r.csv")])
    printed = capsys.readouterr().out
    # Assert: the estimate is printed and kept, nothing is timed
    assert code == 0
    assert "width 4: one server epoch estimated at" in printed and ": skipped" in printed
    _, rows = _rows(tmp_path / "r.csv")
    assert len(rows) == len(STAGES)
    assert all(r["status"] == SKIPPED and float(r["estimate_s"]) > 0 and r["epoch_s"] == ""
               for r in rows)


def test_probe_covers_both_soft_label_chunk_shapes():
    assert probe_steps(500, 8) == 12  # chunks of 8 steps and the last 4
    assert probe_steps(16, 8) == 8
    assert probe_steps(2, 8) == 2


def test_epoch_estimate_hand_computed():
    # Prepare: a 12-step probe; the noise adaptation forwards min(T, 153) steps (beta 0.9,
    # cutoff 1e-7), i.e. all 12 of the probe and 153 of T = 500
    probe = {"real_ms": {"synthesis": 10.0, "noise_adaptation": 4.0, "soft_labels": 5.0,
                         "bilevel": 20.0}}
    cfg = BenchConfig(steps=500, model="tiny", check=False)
    # Execute / Assert: (10 + 5 + 20) ms x 500 + 4 ms x 12 / 12 x 153
    assert estimate_epoch_s(probe, 12, cfg) == pytest.approx((35 * 500 + 4 * 153) / 1e3)


def test_peak_is_measured_per_dtype_and_picked_by_the_run_dtype():
    peaks = measure_peak(torch.device("cpu"), TINY_SIZES)
    assert set(peaks) <= {"fp32", "bf16"} and "fp32" in peaks
    p = peaks["fp32"]
    assert p["flops_per_s"] == max(p["gemm_flops_per_s"], p["conv_flops_per_s"]) > 0
    assert peak_for(peaks, "fp32") == p["flops_per_s"]
    assert peak_for({"fp32": p}, "bf16") is None


def test_the_comparison_fails_for_runs_that_differ():
    # Prepare: two seeds, i.e. other noise, jitter, labels and student initialisations
    first = tiny_run(TINY_CHECK, 0, torch.device("cpu"))
    second = tiny_run(TINY_CHECK, 1, torch.device("cpu"))
    probe = torch.randn(4, 1, TINY_CHECK.image_size, TINY_CHECK.image_size)
    # Execute
    same, other = compare_runs(first, first, probe), compare_runs(second, first, probe)
    # Assert: a run against itself passes with zero errors; against the other seed the
    # images and the cluster models' outputs are far outside the tolerance
    assert all(c.passed and c.max_error == 0.0 for c in same)
    failed = [c.name for c in other if not c.passed]
    assert sum("synthetic images" in n for n in failed) == 2
    assert sum("outputs on probe images" in n for n in failed) == 2


@pytest.mark.parametrize("device,fragment", [
    ("banana", "device 'banana' is not cpu, cuda or cuda:<index>"),
    pytest.param("cuda", "torch sees no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_a_wrong_device_is_one_line(device, fragment, capsys):
    code = main(["bench", "--device-check", "--tiny", "--device", device])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("configuration error: bench:") and fragment in err, err


@pytest.mark.parametrize("argv,fragment", [
    (["--tiny"], "--tiny needs --device-check"),
    (["--device-check", "--tiny", "--widths", "4,x"], "--widths must be comma-separated"),
    (["--device-check", "--tiny", "--widths", "2"], "width must be in [4, 128]"),
    (["--device-check", "--tiny", "--budget-s", "-1"], "--budget-s must be >= 0"),
    (["--device-check", "--scaling", "clients=2,3"], "two modes"),
])
def test_bad_device_check_arguments_are_one_line(argv, fragment, capsys):
    code = main(["bench", "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and fragment in err, err
