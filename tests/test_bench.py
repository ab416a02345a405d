"""Server-stage benchmark: the real-vs-reference equality checks run and can fail; scaling; CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fedbicross_flwr.cli import main
from fedbicross_flwr.experiments.benchmark.hardware import estimate_peak_flops
from fedbicross_flwr.experiments.benchmark.scaling import format_sweep, parse_sweep, run_sweep
from fedbicross_flwr.experiments.benchmark.server_stage import (
    LOOSE_RTOL,
    TIGHT_RTOL,
    BenchConfig,
    rel_err,
    run_benchmark,
)

TINY = dict(num_clients=3, num_clusters=2, batch=8, steps=3, ref_steps=1, model="tiny",
            in_channels=1, num_classes=3, image_size=8, warmup=False)


def test_bf16_benchmark_checks_both_precisions_against_the_reference():
    # Execute
    report = run_benchmark(BenchConfig(**TINY, dtype="bf16"))
    # Assert: synthesis per cluster, one bi-level step and the noise adaptation (Eq. 3 over
    # every step in float32), each in bf16 (loose) and fp32 (tight)
    names = [c["name"] for c in report["checks"]]
    assert len(names) == 2 * 2 + 2 + 2
    assert sum("synthesis" in n for n in names) == 4 and sum("bi-level" in n for n in names) == 2
    assert sum("noise adaptation (3 of 3 steps)" in n for n in names) == 2
    for check in report["checks"]:
        assert check["rtol"] == (LOOSE_RTOL if "real-bf16" in check["name"] else TIGHT_RTOL)
        assert check["passed"], check
        assert set(check["errors"]) in ({"CE", "R_BN", "R_TV", "grad_x"},
                                        {"student_update", "val_loss", "weights"},
                                        {"bn_statistics"})
    assert report["checks_passed"]
    # Timings and derived numbers exist for both paths
    for stage in ("synthesis", "bilevel", "total"):
        assert report["real_ms"][stage] > 0 and report["reference_ms"][stage] > 0
        assert report["speedup"][stage] == pytest.approx(
            report["reference_ms"][stage] / report["real_ms"][stage])
    assert report["flops"]["total"] > 0 and report["memory"]["peak_mib"] > 0


def test_perturbed_reference_inputs_fail_the_checks():
    # Prepare: the reference sees images with N(0, 0.3^2) noise added (BN statistics averaged
    # over the trajectory move by only 0.4 % under 0.1, below the tight tolerance)
    cfg = BenchConfig(**TINY, dtype="fp32", perturb=0.3)
    # Execute
    report = run_benchmark(cfg)
    # Assert: every check compares different inputs now, so every one fails
    assert report["checks"] and not report["checks_passed"]
    assert all(not c["passed"] for c in report["checks"])


def test_rel_err_hand_computed():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])
    assert rel_err(a, b) == pytest.approx(3.0 / 4.0)
    assert rel_err(torch.tensor(0.3), torch.tensor(0.1), floor=1.0) == pytest.approx(0.2)


def test_synthesis_flops_grow_linearly_with_the_number_of_clients():
    # Prepare: one cluster, so every client is a member of the synthesising ensemble
    cfg = BenchConfig(**{**TINY, "num_clusters": 1, "steps": 1}, dtype="fp32", check=False)
    # Execute
    axis, values = parse_sweep("clients=2,4")
    rows = run_sweep(cfg, axis, values)
    # Assert: twice the members, exactly twice the counted synthesis FLOPs; bi-level unchanged
    assert [r["N"] for r in rows] == [2, 4]
    assert rows[1]["synthesis_gflop"] == pytest.approx(2 * rows[0]["synthesis_gflop"])
    assert rows[1]["bilevel_gflop"] == pytest.approx(rows[0]["bilevel_gflop"])
    assert format_sweep(rows, axis).count("\n") == 3


def test_parse_sweep_rejects_unknown_axis():
    with pytest.raises(ValueError, match="--scaling"):
        parse_sweep("steps=1,2")


def test_cpu_peak_estimate_doubles_for_bf16_only_with_avx512_bf16():
    fp32, how = estimate_peak_flops(torch.device("cpu"), bf16=False)
    bf16, _ = estimate_peak_flops(torch.device("cpu"), bf16=True)
    assert fp32 is None or (fp32 > 0 and bf16 in (fp32, 2 * fp32)), how


def test_cli_bench_prints_report_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "tiny", "--clients", "2", "--clusters", "2", "--batch", "6",
                 "--steps", "2", "--ref-steps", "1", "--num-classes", "3", "--image-size", "8",
                 "--dtype", "fp32", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "all checks passed: True" in printed and "speed-up" in printed
    assert json.loads(out.read_text())["checks_passed"] is True
