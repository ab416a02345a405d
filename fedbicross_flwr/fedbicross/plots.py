"""Result files of FedBiCross's server side: the cross-cluster weight history (CSV + plot)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..storage.atomic import open_text, save_figure  # noqa: E402


def save_weight_history_csv(weight_history: np.ndarray, path: str | Path) -> Path:
    """Write the (S, K, K) weight history as a long CSV: step, target, source, weight.

    Parameters
    ----------
    weight_history : np.ndarray
        (S, K, K), entry [s, k, j] = w_{k,j} after step s+1.
    path : str or Path
        Output file (parent folders are created).

    Returns
    -------
    Path
    """
    history = np.asarray(weight_history)
    if history.ndim != 3 or history.shape[1] != history.shape[2]:
        raise ValueError(f"weight_history must be (S, K, K), got {history.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_text(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "target_cluster", "source_cluster", "weight"])
        for step, matrix in enumerate(history, start=1):
            for k, row in enumerate(matrix):
                for j, value in enumerate(row):
                    writer.writerow([step, k, j, f"{value:.6f}"])
    return path


def plot_weight_history(weight_history: np.ndarray, path: str | Path, steps_per_epoch: int | None = None) -> Path:
    """One panel per target cluster k, one line per source cluster j: w_{k,j} over the steps.

    Parameters
    ----------
    weight_history : np.ndarray
        (S, K, K).
    path : str or Path
        Output image (e.g. .png).
    steps_per_epoch : int, optional
        T; draws dotted lines at server-epoch boundaries.

    Returns
    -------
    Path
    """
    history = np.asarray(weight_history)
    num_steps, K, _ = history.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, K, figsize=(4 * K, 3), squeeze=False, sharey=True)
    steps = np.arange(1, num_steps + 1)
    for k, ax in enumerate(axes[0]):
        for j in range(K):
            ax.plot(steps, history[:, k, j], label=f"from cluster {j}")
        if steps_per_epoch:
            for boundary in range(steps_per_epoch, num_steps, steps_per_epoch):
                ax.axvline(boundary + 0.5, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"target cluster {k}")
        ax.set_xlabel("bi-level step")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("cross-cluster weight $w_{k,j}$")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


# Name symmetric with save_weight_history_csv.
save_weight_history_plot = plot_weight_history
