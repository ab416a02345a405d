"""Scaling of the server stage with N (clients), K (clusters) or B (batch): sweep, table, plot."""

from __future__ import annotations

from dataclasses import replace
from logging import INFO
from pathlib import Path
from typing import Any

from ...logging_utils import log
from ...storage.atomic import save_figure
from .server_stage import BenchConfig, run_benchmark

_AXES = {"clients": "num_clients", "clusters": "num_clusters", "batch": "batch"}
_STAGES = ("synthesis", "noise_adaptation", "soft_labels", "bilevel", "total")


def parse_sweep(text: str) -> tuple[str, list[int]]:
    """'clients=5,10,20' -> ('clients', [5, 10, 20])."""
    axis, _, values = text.partition("=")
    axis = axis.strip()
    if axis not in _AXES or not values:
        raise ValueError(f"--scaling must look like clients=5,10 (axes {sorted(_AXES)}), got {text!r}")
    return axis, [int(v) for v in values.split(",") if v.strip()]


def run_sweep(cfg: BenchConfig, axis: str, values: list[int]) -> list[dict[str, Any]]:
    """Real path only (no reference), one benchmark per value; rows of ms and GFLOP per step."""
    rows = []
    for value in values:
        changes: dict[str, Any] = {_AXES[axis]: value}
        run_cfg = replace(cfg, check=False, **changes)
        report = run_benchmark(run_cfg)
        row: dict[str, Any] = {"N": run_cfg.num_clients, "K": run_cfg.num_clusters,
                               "B": run_cfg.batch, "T": run_cfg.steps}
        row.update({f"{stage}_ms": report["real_ms"][stage] for stage in _STAGES})
        row.update({f"{stage}_gflop": report["flops"][stage] / 1e9 for stage in _STAGES})
        row["images_per_s"] = report["images_per_s"]
        row["peak_mib"] = report["memory"]["peak_mib"]
        log(INFO, "scaling %s=%s: %.0f ms per step (synthesis %.0f, bi-level %.0f)", axis, value,
            row["total_ms"], row["synthesis_ms"], row["bilevel_ms"])
        rows.append(row)
    return rows


def format_sweep(rows: list[dict[str, Any]], axis: str) -> str:
    """A Markdown table: one row per value, ms per trajectory step and GFLOP per stage."""
    head = ("| N | K | B | T | synthesis ms | noise adapt. ms | soft labels ms | bi-level ms "
            "| total ms | synthesis GFLOP | bi-level GFLOP | images/s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['K']} | {r['B']} | {r['T']} | {r['synthesis_ms']:.0f} "
            f"| {r['noise_adaptation_ms']:.0f} | {r['soft_labels_ms']:.0f} | {r['bilevel_ms']:.0f} "
            f"| {r['total_ms']:.0f} | {r['synthesis_gflop']:.3g} | {r['bilevel_gflop']:.3g} "
            f"| {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], axis: str, path: Path) -> None:
    """Log-log plot of ms per step by stage against the swept value, with slope guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = {"clients": "N", "clusters": "K", "batch": "B"}[axis]
    xs = [r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for stage in ("synthesis", "bilevel", "total"):
        ax.plot(xs, [r[f"{stage}_ms"] for r in rows], marker="o", label=stage)
    base = rows[0]
    # Guides with the growth the FLOP count predicts (docs/BENCHMARKS.md): synthesis ~ N B,
    # bi-level ~ K^2 B and independent of N.
    powers = {"N": (1, 0), "K": (0, 2), "B": (1, 1)}[key]
    for power, stage, style in zip(powers, ("synthesis", "bilevel"), (":", "--")):
        ax.plot(xs, [base[f"{stage}_ms"] * (x / xs[0]) ** power for x in xs], style, color="grey",
                label=f"{stage} expected ~ {key}^{power}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("ms per trajectory step")
    ax.set_title(f"server stage vs {key} (others: " + ", ".join(
        f"{k}={base[k]}" for k in ("N", "K", "B", "T") if k != key) + ")")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
