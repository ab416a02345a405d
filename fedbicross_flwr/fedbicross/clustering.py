"""Stage 1, client clustering via output similarity on noise (paper Sec. III-A-1).

Each client model f_i maps M random noise images to an M x C softmax matrix p_i; K-means on the
flattened matrices groups clients whose models disagree the least, so each cluster's ensemble
teacher gives peaked rather than near-uniform soft labels.
"""

from __future__ import annotations

import warnings
from logging import INFO, WARNING
from typing import Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from ..distill.utils import cpu_generator, model_dtype, preserved_modes
from ..logging_utils import log


@torch.no_grad()
def noise_predictions(
    models: Sequence[nn.Module],
    num_noise: int,
    in_channels: int,
    seed: int,
    device: torch.device | str,
    image_size: int = 28,
    batch_size: int = 256,
) -> np.ndarray:
    """Prediction matrices p_i = [f_i(z_1), ..., f_i(z_M)] on shared N(0, 1) noise.

    The noise lives in the normalised input space (the models see mean-0.5/std-0.5 inputs, so
    N(0, 1) is "pixel noise around grey"). Models are evaluated in eval mode; their modes are
    restored afterwards.

    Parameters
    ----------
    models : Sequence[nn.Module]
        The N client models, already on ``device``.
    num_noise : int
        M, number of noise images.
    in_channels : int
        Image channels.
    seed : int
        Seed of the noise (drawn on CPU, so identical on every device).
    device : torch.device or str
        Where to run the models.
    image_size : int
        Height = width of the images.
    batch_size : int
        Noise images per forward pass.

    Returns
    -------
    np.ndarray
        (N, M * C) float64, row i is client i's flattened softmax matrix.
    """
    if not models:
        raise ValueError("models must not be empty")
    device = torch.device(device)
    noise = torch.randn(
        (num_noise, in_channels, image_size, image_size), generator=cpu_generator(seed)
    )  # (M, C_in, H, W)
    rows = []
    with preserved_modes(models):
        for model in models:
            model.eval()
            probs = []
            for start in range(0, num_noise, batch_size):
                z = noise[start : start + batch_size].to(device, model_dtype(model))
                probs.append(torch.softmax(model(z).float(), dim=1).cpu())  # (b, C)
            rows.append(torch.cat(probs).flatten())  # (M * C,)
    return torch.stack(rows).double().numpy()


def degenerate_clients(preds: np.ndarray, num_classes: int) -> list[int]:
    """Indices of clients whose model predicts the same class for every noise image.

    Parameters
    ----------
    preds : np.ndarray
        (N, M * C) output of :func:`noise_predictions`.
    num_classes : int
        C.

    Returns
    -------
    list[int]
        Degenerate client indices, ascending.
    """
    argmax = preds.reshape(preds.shape[0], -1, num_classes).argmax(axis=2)  # (N, M)
    return [i for i in range(preds.shape[0]) if np.unique(argmax[i]).size == 1]


def kmeans_labels(preds: np.ndarray, num_clusters: int, seed: int, n_init: int = 10) -> np.ndarray:
    """K-means on the flattened prediction matrices (minimises sum ||p_i - c_k||_F^2).

    Labels are made deterministic and non-empty: every cluster gets at least one client (if
    K-means leaves one empty, e.g. because fewer than K distinct outputs exist, the client
    farthest from its centroid in a cluster of size >= 2 is moved there), and clusters are
    numbered in order of their smallest client index (client 0 is always in cluster 0).

    Parameters
    ----------
    preds : np.ndarray
        (N, D) prediction matrices, one row per client.
    num_clusters : int
        K, 1 <= K <= N.
    seed : int
        K-means ``random_state``.
    n_init : int
        K-means restarts.

    Returns
    -------
    np.ndarray
        (N,) int64 cluster index of each client, values 0..K-1, each used at least once.
    """
    preds = np.asarray(preds, dtype=np.float64)
    if preds.ndim != 2:
        raise ValueError(f"preds must be 2-D (N, D), got shape {preds.shape}")
    n_clients = preds.shape[0]
    if not 1 <= num_clusters <= n_clients:
        raise ValueError(
            f"num_clusters must be in [1, N={n_clients}] (one client per cluster at least), "
            f"got {num_clusters}"
        )
    if num_clusters == 1:
        return np.zeros(n_clients, dtype=np.int64)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kmeans = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed).fit(preds)
    for warning in caught:
        log(WARNING, "K-means: %s", warning.message)
    labels = kmeans.labels_.astype(np.int64)
    centers = kmeans.cluster_centers_

    for empty in range(num_clusters):
        if np.any(labels == empty):
            continue
        sizes = np.bincount(labels, minlength=num_clusters)
        distances = np.linalg.norm(preds - centers[labels], axis=1)
        distances[sizes[labels] < 2] = -np.inf  # never empty another cluster
        moved = int(np.argmax(distances))
        log(WARNING, "K-means left cluster %s empty: moving client %s into it", empty, moved)
        labels[moved] = empty

    # Renumber clusters by first appearance in client order, independent of K-means' numbering.
    mapping: dict[int, int] = {}
    for label in labels:
        mapping.setdefault(int(label), len(mapping))
    return np.array([mapping[int(label)] for label in labels], dtype=np.int64)


def cluster_centroids(preds: np.ndarray, labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """(K, D) mean prediction matrix c_k of each cluster."""
    return np.stack([preds[labels == k].mean(axis=0) for k in range(num_clusters)])


def similarity_weights(centroids: np.ndarray) -> np.ndarray:
    """Cross-cluster weights of the 'similarity' ablation: row-normalised cosine similarity.

    w_{k,j} = cos(c_k, c_j) / sum_j' cos(c_k, c_j'). Centroids are averages of probabilities,
    hence non-negative, so every cosine is in [0, 1] and cos(c_k, c_k) = 1 > 0: each row lies
    on the simplex.

    Parameters
    ----------
    centroids : np.ndarray
        (K, D) cluster centroids.

    Returns
    -------
    np.ndarray
        (K, K) float64, rows on the probability simplex.
    """
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)
    cosine = np.clip(unit @ unit.T, 0.0, None)  # (K, K)
    return cosine / cosine.sum(axis=1, keepdims=True)


def log_clustering(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> list[int]:
    """Log cluster membership and warn about degenerate client models; return those clients."""
    degenerate = degenerate_clients(preds, num_classes)
    if degenerate:
        argmax = preds.reshape(preds.shape[0], -1, num_classes).argmax(axis=2)
        classes = {i: int(argmax[i, 0]) for i in degenerate}
        log(
            WARNING,
            "Degenerate client models (one class on all noise images) {client: class}: %s",
            classes,
        )
        if len(degenerate) == preds.shape[0] and len(set(classes.values())) == 1:
            log(WARNING, "All client models predict the same class on noise: clustering is uninformative")
    members = {k: np.flatnonzero(labels == k).tolist() for k in range(int(labels.max()) + 1)}
    log(INFO, "Client clusters {cluster: clients}: %s", members)
    return degenerate
