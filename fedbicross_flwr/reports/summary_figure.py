"""The summary picture of a multi-method run: one PNG with three panels.

(a) mean client accuracy per method, official and label-following view, on the received model
    and after personalization (grouped bars), with the majority-class rate as a line;
(b) FedBiCross's synthetic images, one row per cluster (from its run folder's ``synthetic.pt``);
(c) FedBiCross's learned cross-cluster weights w_{k,j} over the bi-level steps (``weights.csv``).

Panels (b) and (c) say so when the run has no FedBiCross folder or the file is missing.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedbicross_flwr.storage.atomic import save_figure  # noqa: E402

BARS = (("official-received", "official, received"),
        ("official-after", "official, after pers."),
        ("label-following-received", "label-following, received"),
        ("label-following-after", "label-following, after pers."))
IMAGES_PER_CLUSTER = 8


def read_weight_history(path: Path) -> np.ndarray:
    """``weights.csv`` (step, target_cluster, source_cluster, weight) -> (S, K, K)."""
    with path.open() as fh:
        rows = [(int(r["step"]), int(r["target_cluster"]), int(r["source_cluster"]),
                 float(r["weight"])) for r in csv.DictReader(fh)]
    steps = max(r[0] for r in rows)
    k = max(max(r[1], r[2]) for r in rows) + 1
    history = np.full((steps, k, k), np.nan)
    for step, target, source, weight in rows:
        history[step - 1, target, source] = weight
    return history


def image_mosaic(images_per_cluster: list[torch.Tensor], per_row: int) -> np.ndarray:
    """K rows of up to ``per_row`` images (normalised mean 0.5, std 0.5) as one (H, W, C)
    array in [0, 1], with a 1-pixel white gap; C is 1 (grey) or 3.
    """
    rows = []
    c, h, w = images_per_cluster[0].shape[1:]
    gap = 1
    for images in images_per_cluster:
        row = np.ones((h, per_row * (w + gap), c))
        for i, image in enumerate(images[:per_row]):
            pixels = (image.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
            row[:, i * (w + gap):i * (w + gap) + w] = pixels
        rows += [row, np.ones((gap, row.shape[1], c))]
    return np.concatenate(rows[:-1])


def _note(ax: Axes, title: str, text: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.axis("off")


def summary_figure(rows: list[dict[str, Any]],
                   fedbicross_dir: Path | None) -> tuple[Figure, list[Axes]]:
    """Draw the three panels; returns the figure and its axes (accuracy, images, weights).

    Parameters
    ----------
    rows : list of dict
        :func:`fedbicross_flwr.reports.comparison.comparison_rows`.
    fedbicross_dir : Path or None
        FedBiCross's run folder, if the run has one.
    """
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6),
                             gridspec_kw={"width_ratios": [1.4, 1.0, 1.0]})
    acc, pics, weights = axes

    # (a) accuracy per method and view --------------------------------------------------------
    x = np.arange(len(rows))
    width = 0.8 / len(BARS)
    for b, (col, label) in enumerate(BARS):
        values = [np.nan if r[col] is None else 100 * r[col] for r in rows]
        acc.bar(x + (b - (len(BARS) - 1) / 2) * width, values, width, label=label,
                color=plt.get_cmap("tab20")(b), edgecolor="black", linewidth=0.4)
    majority = rows[0].get("majority-rate") if rows else None
    if majority is not None:
        acc.axhline(100 * majority, color="grey", linestyle="--", linewidth=1,
                    label="majority-class rate")
    acc.set_xticks(x, [r["method"] for r in rows])
    acc.set_ylabel("mean client accuracy (%)")
    acc.set_title(f"(a) accuracy per method and view ({rows[0]['dataset'] if rows else ''})")
    # the legend sits in a band above 100 %, clear of the bars
    acc.legend(fontsize="small", loc="upper center", ncol=3, frameon=False)
    acc.set_ylim(0, 120)
    acc.set_yticks(range(0, 101, 20))

    # (b) synthetic images per cluster ---------------------------------------------------------
    synthetic = fedbicross_dir / "synthetic.pt" if fedbicross_dir else None
    if synthetic is not None and synthetic.is_file():
        images = torch.load(synthetic, map_location="cpu", weights_only=True)["images"]
        mosaic = image_mosaic(images, IMAGES_PER_CLUSTER)
        h = images[0].shape[2] + 1
        if mosaic.shape[2] == 1:
            pics.imshow(mosaic[:, :, 0], cmap="gray", vmin=0, vmax=1)
        else:
            pics.imshow(mosaic)
        pics.set_yticks([k * h + h / 2 for k in range(len(images))],
                        [f"cluster {k}" for k in range(len(images))])
        pics.set_xticks([])
        pics.set_title("(b) FedBiCross synthetic images x^(T)")
    else:
        _note(pics, "(b) FedBiCross synthetic images", "no FedBiCross synthetic images\n"
              "(fedbicross not among the methods)")

    # (c) learned cross-cluster weights --------------------------------------------------------
    weight_csv = fedbicross_dir / "weights.csv" if fedbicross_dir else None
    if weight_csv is not None and weight_csv.is_file():
        history = read_weight_history(weight_csv)
        steps = np.arange(1, len(history) + 1)
        for k in range(history.shape[1]):
            for j in range(history.shape[2]):
                weights.plot(steps, history[:, k, j], label=f"w[{k},{j}]: cluster {j} -> {k}",
                             linestyle="-" if k == j else "--")
        weights.set_ylim(-0.02, 1.02)
        weights.set_xlabel("bi-level step")
        weights.set_ylabel("cross-cluster weight")
        weights.legend(fontsize="small")
        weights.set_title("(c) FedBiCross learned cross-cluster weights")
    else:
        _note(weights, "(c) FedBiCross cross-cluster weights", "no FedBiCross weights\n"
              "(fedbicross not among the methods)")
    fig.tight_layout()
    return fig, list(axes)


def write_summary_figure(path: Path, rows: list[dict[str, Any]],
                         run_dirs: dict[str, Path]) -> Path:
    """Draw :func:`summary_figure` for a run's methods and save it as a PNG at ``path``."""
    fig, _ = summary_figure(rows, run_dirs.get("fedbicross"))
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path
