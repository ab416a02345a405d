"""Result files of the server side: cross-cluster weight history (CSV + plot) and synthetic images."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


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
    with path.open("w", newline="") as handle:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_synthetic_grid(
    images_per_cluster: Sequence[Tensor],
    path: str | Path,
    labels_per_cluster: Sequence[Tensor] | None = None,
    max_per_cluster: int = 16,
) -> Path:
    """Picture grid of synthetic images: one row per cluster; the images themselves go to
    ``<path>.pt`` (``{"images": K x (n, C, H, W)}``, loadable with ``weights_only=True``).

    Parameters
    ----------
    images_per_cluster : Sequence[Tensor]
        K tensors (n, C, H, W) normalised with mean 0.5, std 0.5 (C = 1 or 3).
    path : str or Path
        Output image.
    labels_per_cluster : Sequence[Tensor], optional
        K tensors (n,) target labels, written above each image.
    max_per_cluster : int
        Images shown per row.

    Returns
    -------
    Path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(1, len(images_per_cluster))
    cols = max(1, min(max_per_cluster, max((len(x) for x in images_per_cluster), default=1)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, images in enumerate(images_per_cluster):
        for i, image in enumerate(images[:cols]):
            # Undo the mean-0.5/std-0.5 normalisation back to [0, 1] pixels.
            pixels = (image.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
            ax = axes[k][i]
            if pixels.shape[2] == 1:
                ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(pixels)
            title = f"k={k}" if i == 0 else ""
            if labels_per_cluster is not None:
                title = f"{title} y={int(labels_per_cluster[k][i])}".strip()
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    # The pictured images as tensors too (``knowledge.json`` measures the student on them).
    # clone(): a slice of a trajectory is a view, and torch.save writes a view's whole storage.
    torch.save({"images": [x.detach().float().cpu().clone() for x in images_per_cluster]},
               path.with_suffix(".pt"))
    return path


# Name symmetric with save_weight_history_csv.
save_weight_history_plot = plot_weight_history
