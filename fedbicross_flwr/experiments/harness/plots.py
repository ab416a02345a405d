"""Figures of a grid: accuracy versus alpha per method, and a bar chart like the paper's Fig. 2."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fedbicross_flwr.experiments.harness.tables import row_label
from fedbicross_flwr.storage.atomic import save_figure


def _save(fig: Any, path: Path) -> None:
    """Save ``fig`` at ``path`` whole or not at all, and close it."""
    import matplotlib.pyplot as plt

    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = 100 * statistics.fmean(values)
    return mean, (100 * statistics.stdev(values) if len(values) > 1 else 0.0)


def _legend(fig, axes) -> None:
    """One legend for all panels (each label once), right of the last panel."""
    handles: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="center left",
                    bbox_to_anchor=(1.0, 0.5))


def accuracy_vs_alpha(rows: list[dict[str, Any]], path: Path, num_clients: int,
                      metric: str = "official-after") -> Path | None:
    """One panel per dataset: mean accuracy over seeds (error bar: std) against alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["num-clients"] == num_clients and r.get(metric) is not None]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6),
                             squeeze=False)
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(dict.fromkeys(row_label(r)
                                                                    for r in rows))}
    for ax, ds in zip(axes[0], datasets):
        sub = [r for r in rows if r["dataset"] == ds]
        for label in dict.fromkeys(row_label(r) for r in sub):
            alphas = sorted({r["alpha"] for r in sub if row_label(r) == label})
            stats = [_mean_std([r[metric] for r in sub if row_label(r) == label
                                and r["alpha"] == a]) for a in alphas]
            ax.errorbar(alphas, [s[0] for s in stats], yerr=[s[1] for s in stats],
                        marker="o", capsize=3, label=label, color=colors[label])
        rates = {r["alpha"]: r["majority-rate"] for r in sub if r.get("majority-rate")}
        if rates:
            a = sorted(rates)
            ax.plot(a, [100 * rates[x] for x in a], "k--", lw=1, label="majority class")
        ax.set_title(f"{ds}, N={num_clients}")
        ax.set_xlabel("alpha (Dirichlet)")
        ax.set_ylabel("accuracy % (official test)" if metric.startswith("official")
                      else "accuracy %")
        ticks = sorted({r["alpha"] for r in sub})
        ax.set_xticks(ticks, [f"{a:g}" for a in ticks])
    _legend(fig, axes[0])
    fig.tight_layout()
    _save(fig, path)
    return path


def fig2_bars(rows: list[dict[str, Any]], path: Path, labels: list[str],
              metric: str = "official-after") -> Path | None:
    """Like Fig. 2: per dataset, bars of ``labels`` (clustering variants / K) per (N, alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if row_label(r) in labels and r.get(metric) is not None]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 3.6),
                             squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = [r for r in rows if r["dataset"] == ds]
        groups = sorted({(r["num-clients"], r["alpha"]) for r in sub})
        present = [lab for lab in labels if any(row_label(r) == lab for r in sub)]
        width = 0.8 / max(len(present), 1)
        for j, label in enumerate(present):
            xs, means, stds = [], [], []
            for i, (n, a) in enumerate(groups):
                vals = [r[metric] for r in sub if row_label(r) == label
                        and r["num-clients"] == n and r["alpha"] == a]
                if vals:
                    m, s = _mean_std(vals)
                    xs.append(i + j * width)
                    means.append(m)
                    stds.append(s)
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=label,
                   color=f"C{labels.index(label) % 10}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"N={n}\nα={a:g}" for n, a in groups], fontsize=8)
        ax.set_title(ds)
        ax.set_ylabel("accuracy % (official test)")
    _legend(fig, axes[0])
    fig.tight_layout()
    _save(fig, path)
    return path
