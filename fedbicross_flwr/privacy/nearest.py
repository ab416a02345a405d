"""Do the server's synthetic images copy training images? Nearest neighbours under pixel SSIM.

For every synthetic image the audit finds its most similar image (structural similarity, SSIM,
of the pixels in [0, 1]) in two pools of equal size:

* the **train pool**: the training images of the run's clients (what their uploads saw);
* the **test pool**: images of the official test split (never seen by any client).

The larger pool is subsampled to the size of the smaller with a seeded sampler, so that when
the synthetic images carry nothing of the particular training images, each pool holds the
nearest neighbour with probability 1/2: the **reference share is 50 %**. The audit reports the
share of synthetic images whose nearest neighbour is a training image, with an exact binomial
95 % confidence interval and the two-sided binomial test against 50 %. As a check of that
reference on real data, the same share is measured for images of the official validation split
(non-members that are in neither pool): it should lie near 50 %.

SSIM is scikit-image's ``structural_similarity`` with its defaults (7 x 7 uniform window,
K1 = 0.01, K2 = 0.03, sample covariance, mean over the valid area and over channels),
vectorised over the pool here; ``tests/test_privacy_nearest.py`` checks it against
scikit-image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedbicross_flwr.storage.atomic import save_figure

WIN = 7
K1, K2 = 0.01, 0.03
REFERENCE_SHARE = 0.5


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images normalised with mean 0.5 / std 0.5 -> float64 pixels in [0, 1]."""
    return (x.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1).double().numpy()


@dataclass(frozen=True)
class PoolStats:
    """Local means and variances of a pool of images, computed once for every query."""

    pixels: np.ndarray  # (N, C, H, W)
    mean: np.ndarray  # local means, same shape
    var: np.ndarray  # local sample variances, same shape


def _local_mean(a: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    return uniform_filter(a, size=(1,) * (a.ndim - 2) + (WIN, WIN))


def pool_stats(pixels: np.ndarray) -> PoolStats:
    """Local statistics of ``pixels`` (N, C, H, W) in [0, 1]."""
    norm = WIN * WIN / (WIN * WIN - 1)
    mean = _local_mean(pixels)
    return PoolStats(pixels, mean, norm * (_local_mean(pixels * pixels) - mean * mean))


def ssim_to_pool(query: np.ndarray, pool: PoolStats, data_range: float = 1.0) -> np.ndarray:
    """SSIM of one image (C, H, W) against every pool image: (N,).

    Raises
    ------
    ValueError
        The query's shape differs from the pool's images, or the images are smaller than the
        7 x 7 window.
    """
    if query.shape != pool.pixels.shape[1:]:
        raise ValueError(f"query shape {query.shape} differs from the pool's "
                         f"{pool.pixels.shape[1:]}")
    if min(query.shape[-2:]) < WIN:
        raise ValueError(f"images of {query.shape[-2:]} pixels are smaller than the SSIM "
                         f"window {WIN}")
    norm = WIN * WIN / (WIN * WIN - 1)
    q = query[None]
    mq = _local_mean(q)
    vq = norm * (_local_mean(q * q) - mq * mq)
    cov = norm * (_local_mean(q * pool.pixels) - mq * pool.mean)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mq * pool.mean + c1) * (2 * cov + c2)
         / ((mq * mq + pool.mean * pool.mean + c1) * (vq + pool.var + c2)))
    pad = (WIN - 1) // 2
    return s[..., pad:-pad, pad:-pad].mean(axis=(1, 2, 3))


def nearest(queries: np.ndarray, pool: PoolStats) -> tuple[np.ndarray, np.ndarray]:
    """For each query (N, C, H, W): the index of its most similar pool image and that SSIM."""
    index, score = np.zeros(len(queries), np.int64), np.zeros(len(queries))
    for i, q in enumerate(queries):
        s = ssim_to_pool(q, pool)
        index[i] = int(np.argmax(s))
        score[i] = float(s[index[i]])
    return index, score


def equal_pools(n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two pools of size min(n_train, n_test): the larger one subsampled without
    replacement by ``numpy.random.default_rng(seed)``, the smaller one whole (sorted).
    """
    size = min(n_train, n_test)
    rng = np.random.default_rng(seed)
    pick = lambda n: np.sort(rng.choice(n, size, replace=False)) if n > size else np.arange(n)  # noqa: E731
    return pick(n_train), pick(n_test)


@dataclass(frozen=True)
class ShareTest:
    """Share of queries whose nearest neighbour is a training image, against 50 %."""

    n: int  # queries without a tie
    closer_to_train: int
    ties: int  # equally similar to both pools (left out of n)
    share: float | None
    ci_low: float | None  # exact (Clopper-Pearson) 95 % interval
    ci_high: float | None
    p_value: float | None  # two-sided binomial test against the reference
    reference: float = REFERENCE_SHARE


def share_test(best_train: np.ndarray, best_test: np.ndarray) -> ShareTest:
    """Binomial test of "closer to a training image than to any test image"."""
    from scipy.stats import binomtest

    train_wins = int(np.sum(best_train > best_test))
    ties = int(np.sum(best_train == best_test))
    n = len(best_train) - ties
    if n == 0:
        return ShareTest(0, 0, ties, None, None, None, None)
    result = binomtest(train_wins, n, REFERENCE_SHARE)
    ci = result.proportion_ci(0.95, method="exact")
    return ShareTest(n, train_wins, ties, train_wins / n, float(ci.low), float(ci.high),
                     float(result.pvalue))


@dataclass
class NearestResult:
    """Nearest neighbours of the synthetic images (and of the real non-member queries)."""

    pool_size: int
    train_available: int
    test_available: int
    synthetic: ShareTest
    control: ShareTest | None  # official-validation images as queries
    best_train: np.ndarray  # (n_synthetic,) SSIM to the nearest training image
    best_test: np.ndarray
    train_index: np.ndarray  # index into the train pool's images
    test_index: np.ndarray


def nearest_audit(synthetic: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                  control: torch.Tensor | None, seed: int
                  ) -> tuple[NearestResult, np.ndarray, np.ndarray]:
    """Run (b) on normalised image tensors (N, C, H, W).

    Returns
    -------
    NearestResult, ndarray, ndarray
        The result, and the train and test pools' pixels (for the pairs picture).
    """
    train_idx, test_idx = equal_pools(len(train), len(test), seed)
    train_px, test_px = to_pixels(train[train_idx]), to_pixels(test[test_idx])
    train_pool, test_pool = pool_stats(train_px), pool_stats(test_px)
    syn = to_pixels(synthetic)
    i_tr, s_tr = nearest(syn, train_pool)
    i_te, s_te = nearest(syn, test_pool)
    control_test = None
    if control is not None and len(control):
        ctl = to_pixels(control)
        control_test = share_test(nearest(ctl, train_pool)[1], nearest(ctl, test_pool)[1])
    result = NearestResult(len(train_idx), len(train), len(test), share_test(s_tr, s_te),
                           control_test, s_tr, s_te, i_tr, i_te)
    return result, train_px, test_px


def save_pairs_picture(path: Path, synthetic_px: np.ndarray, train_px: np.ndarray,
                       test_px: np.ndarray, result: NearestResult, n_pairs: int = 8) -> Path:
    """The ``n_pairs`` synthetic images most similar to a training image: one row each,
    synthetic | nearest training image | nearest test image, with the SSIMs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-result.best_train, kind="stable")[:n_pairs]
    fig, axes = plt.subplots(max(1, len(order)), 3, figsize=(4.2, 1.5 * max(1, len(order))),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, i in enumerate(order):
        cells = [(synthetic_px[i], f"synthetic {i}"),
                 (train_px[result.train_index[i]], f"train SSIM {result.best_train[i]:.2f}"),
                 (test_px[result.test_index[i]], f"test SSIM {result.best_test[i]:.2f}")]
        for col, (img, title) in enumerate(cells):
            pixels = np.transpose(img, (1, 2, 0))
            ax = axes[row][col]
            if pixels.shape[2] == 1:
                ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(pixels)
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path
