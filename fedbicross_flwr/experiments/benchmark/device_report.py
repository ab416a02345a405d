"""``fedbicross bench --device-check``: whether a device computes what the CPU does, how long
one server epoch takes on it, and how close each stage comes to the device's own peak.

Three parts, in this order, within a time budget:

1. :func:`~.device_check.device_check`: a tiny float32 server stage on the CPU and on the
   device from the same seed, compared;
2. :func:`~.peak.measure_peak`: the device's float32 (and native bf16) rate on a large GEMM and
   a large convolution, each timed alone;
3. per model width (16, 32 and 64 by default), one server epoch at the paper's N = 5, K = 2,
   T = 500, B = 256 (:func:`~.server_stage.run_benchmark` without the reference), after a
   short probe of the same shapes that warms up (compiles) and gives the epoch's estimate. A
   width whose estimate does not fit in what is left of ``--budget-s`` is skipped.

For each width and stage (synthesis, noise adaptation, soft labels, bi-level step) it prints
seconds per epoch, ms per trajectory step, the FLOPs torch's counter finds in one step, the
achieved rate and its share of the measured peak, and writes the same rows to CSV and the
whole report to JSON.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, replace
from logging import INFO
from pathlib import Path
from typing import Any

import torch

from ...distill.noise_adapt import effective_steps
from ...fedbicross.config import FedBiCrossSettings
from ...logging_utils import log
from ...storage.atomic import write_text
from ...training import resolve_device
from .device_check import CheckSizes, device_check, format_check
from .hardware import device_name, estimate_peak_flops
from .peak import default_sizes, measure_peak, peak_for
from .server_stage import BenchConfig, run_benchmark

STAGES = ("synthesis", "noise_adaptation", "soft_labels", "bilevel", "total")
CSV_COLUMNS = ("device", "dtype", "compile", "width", "clients", "clusters", "batch", "steps",
               "stage", "status", "estimate_s", "epoch_s", "ms_per_step", "gflop_per_step",
               "achieved_tflop_per_s", "peak_tflop_per_s", "percent_of_peak")
MEASURED, SKIPPED = "measured", "skipped: estimate over the time budget"


@dataclass(frozen=True)
class DeviceReportConfig:
    """What ``--device-check`` runs.

    Attributes
    ----------
    epoch : BenchConfig
        The server epoch of every width (its ``width`` is replaced per width); its device,
        dtype, compile settings, N, K, B, T and seed are the report's.
    widths : tuple of int
        ResNet-18 base widths, run in this order.
    budget_s : float
        Seconds the whole report may take (0: no limit).
    check : CheckSizes
        The tiny run of the device check.
    tiny : bool
        Tiny peak sizes too (tests).
    """

    epoch: BenchConfig
    widths: tuple[int, ...] = (16, 32, 64)
    budget_s: float = 480.0
    check: CheckSizes = CheckSizes()
    tiny: bool = False

    def __post_init__(self) -> None:
        if not self.widths:
            raise ValueError("--widths needs at least one width")
        for width in self.widths:
            replace(self.epoch, width=width)  # the run config's model-width range
        if self.budget_s < 0:
            raise ValueError(f"--budget-s must be >= 0, got {self.budget_s}")


def probe_steps(steps: int, chunk: int) -> int:
    """Steps of the probe: every soft-label chunk shape of a T-step epoch (a full chunk of
    ``chunk`` steps and the remainder T mod chunk), at most T.
    """
    return min(steps, chunk + steps % chunk)


def estimate_epoch_s(probe: dict[str, Any], probe_T: int, cfg: BenchConfig) -> float:
    """Seconds of a T-step epoch from a probe of ``probe_T`` steps of the same shapes.

    Per-step stages scale with T; the noise adaptation forwards only min(T, L) steps (the
    EMA cutoff), so it scales with those. Per-epoch costs (copies, BN folds) are charged to the
    probe's few steps, so the estimate errs high.
    """
    s = FedBiCrossSettings()  # the benchmark's noise momentum and cutoff are the defaults
    probe_L, epoch_L = (effective_steps(T, s.noise_momentum, s.noise_ema_cutoff)
                        for T in (probe_T, cfg.steps))
    ms = probe["real_ms"]
    per_step = sum(ms[name] for name in ("synthesis", "soft_labels", "bilevel")) * cfg.steps
    noise = ms["noise_adaptation"] * probe_T / probe_L * epoch_L
    return (per_step + noise) / 1e3


def _rows(cfg: BenchConfig, status: str, estimate: float | None,
          report: dict[str, Any] | None, peak: float | None) -> list[dict[str, Any]]:
    """The CSV rows of one width: one per stage and the total."""
    rows = []
    for stage in STAGES:
        row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
        row.update(device=cfg.device, dtype=cfg.dtype,
                   compile=cfg.compile_scope if cfg.compile else "off", width=cfg.width,
                   clients=cfg.num_clients, clusters=cfg.num_clusters, batch=cfg.batch,
                   steps=cfg.steps, stage=stage, status=status,
                   estimate_s="" if estimate is None else round(estimate, 3),
                   peak_tflop_per_s="" if peak is None else peak / 1e12)
        if report is not None:
            ms, flops = report["real_ms"][stage], report["flops"][stage]
            rate = flops / (ms / 1e3) if ms > 0 else 0.0
            row.update(epoch_s=ms * cfg.steps / 1e3, ms_per_step=ms, gflop_per_step=flops / 1e9,
                       achieved_tflop_per_s=rate / 1e12,
                       percent_of_peak="" if not peak else 100 * rate / peak)
        rows.append(row)
    return rows


def _widths(cfg: DeviceReportConfig, peak: float | None, start: float) -> list[dict[str, Any]]:
    """Probe, estimate and (within the budget) time one server epoch per width."""
    rows: list[dict[str, Any]] = []
    for width in cfg.widths:
        epoch = replace(cfg.epoch, width=width, check=False, warmup=False)
        probe_T = probe_steps(epoch.steps, FedBiCrossSettings().label_chunk)
        probe_cfg = replace(epoch, steps=probe_T, warmup=True, count=False)
        run_benchmark(probe_cfg)  # warm-up: kernels, allocator, compiles of every shape
        estimate = estimate_epoch_s(run_benchmark(replace(probe_cfg, warmup=False)), probe_T,
                                    epoch)
        elapsed = time.perf_counter() - start
        fits = not cfg.budget_s or elapsed + estimate <= cfg.budget_s
        print(f"width {width}: one server epoch estimated at {estimate:.1f} s from a "
              f"{probe_T}-step probe; {elapsed:.0f} s used"
              + (f" of the {cfg.budget_s:.0f} s budget" if cfg.budget_s else "")
              + ("" if fits else ": skipped"), flush=True)
        if not fits:
            rows += _rows(epoch, SKIPPED, estimate, None, peak)
            continue
        report = run_benchmark(epoch)
        log(INFO, "width %d: %.1f s per server epoch", width,
            report["real_ms"]["total"] * epoch.steps / 1e3)
        rows += _rows(epoch, MEASURED, estimate, report, peak)
    return rows


def run_device_report(cfg: DeviceReportConfig) -> dict[str, Any]:
    """Check, peak and epochs (module docstring); the whole report as a dict.

    Returns
    -------
    dict
        'device', 'device_name', 'torch', 'threads', 'config', 'check' (see
        :func:`~.device_check.device_check`), 'peak' (per dtype, see
        :func:`~.peak.measure_peak`), 'datasheet_peak', 'epochs' (the CSV rows), 'elapsed_s',
        'passed' (the device check).
    """
    start = time.perf_counter()
    device = resolve_device(cfg.epoch.device)
    e = cfg.epoch
    report: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "config": asdict(cfg)}
    report["check"] = device_check(device, cfg.check, e.seed, e.compile, e.compile_scope)
    print(format_check(report["check"]), flush=True)
    report["peak"] = measure_peak(device, default_sizes(device, cfg.tiny))
    sheet, how = estimate_peak_flops(device, e.dtype == "bf16")
    report["datasheet_peak"] = {"flops_per_s": sheet, "how": how}
    print(format_peak(report), flush=True)
    report["epochs"] = _widths(cfg, peak_for(report["peak"], e.dtype), start)
    report["elapsed_s"] = time.perf_counter() - start
    report["passed"] = report["check"]["passed"]
    return report


def format_peak(report: dict[str, Any]) -> str:
    """The measured peak lines (and the datasheet or rough estimate beside them)."""
    lines = [f"peak of {report['device']} ({report['device_name']}), each operation alone:"]
    for dtype, p in report["peak"].items():
        lines.append(f"  {dtype}: GEMM {p['gemm_flops_per_s'] / 1e12:.3g} TFLOP/s, convolution "
                     f"{p['conv_flops_per_s'] / 1e12:.3g} TFLOP/s")
    sheet = report["datasheet_peak"]
    if sheet["flops_per_s"]:
        lines.append(f"  for comparison: {sheet['flops_per_s'] / 1e12:.3g} TFLOP/s "
                     f"({sheet['how']})")
    return "\n".join(lines)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value == "" else format(value, fmt)


def format_epochs(report: dict[str, Any]) -> str:
    """The epochs as a Markdown table (one row per width and stage)."""
    e = report["config"]["epoch"]
    mode = f"compiled ({e['compile_scope']})" if e["compile"] else "eager"
    lines = [f"one server epoch: N={e['num_clients']} K={e['num_clusters']} B={e['batch']} "
             f"T={e['steps']}, {e['dtype']}, {mode}, on {report['device']} "
             f"({report['device_name']}, {report['threads']} threads)",
             "| width | stage | s per epoch | ms per step | GFLOP per step | TFLOP/s "
             f"| % of {e['dtype']} peak |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in report["epochs"]:
        if row["status"] != MEASURED:
            if row["stage"] == "total":
                lines.append(f"| {row['width']} | {row['status']} (estimate "
                             f"{row['estimate_s']:.0f} s) | | | | | |")
            continue
        lines.append(f"| {row['width']} | {row['stage']} | {row['epoch_s']:.2f} "
                     f"| {row['ms_per_step']:.2f} | {row['gflop_per_step']:.4g} "
                     f"| {row['achieved_tflop_per_s']:.3g} "
                     f"| {_cell(row['percent_of_peak'], '.1f')} |")
    lines.append(f"whole report: {report['elapsed_s']:.0f} s")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The epoch rows as CSV (columns :data:`CSV_COLUMNS`), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
