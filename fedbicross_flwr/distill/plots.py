"""Picture grids of synthetic images, for FedBiCross and the data-free baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from fedbicross_flwr.storage.atomic import atomic_path, save_figure  # noqa: E402


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
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    # The pictured images as tensors too (``knowledge.json`` measures the student on them).
    # clone(): a slice of a trajectory is a view, and torch.save writes a view's whole storage.
    with atomic_path(path.with_suffix(".pt")) as tmp:
        torch.save({"images": [x.detach().float().cpu().clone() for x in images_per_cluster]},
                   tmp)
    return path
