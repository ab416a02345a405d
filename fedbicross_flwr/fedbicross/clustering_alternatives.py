"""Clustering ablations of Stage 1: what the clients are grouped on (paper Sec. IV, Fig. 2).

The paper clusters clients by their models' outputs on noise (:mod:`.clustering`) and compares
it with clustering on the model parameters and with CFL-style hierarchical clustering of the
client updates. ``cluster_on`` selects one:

``predictions``   (paper) K-means on the flattened M x C noise prediction matrices.
``parameters``    K-means on the flattened model parameters w_i.
``hierarchical``  CFL (Sattler et al., 2020): complete-linkage agglomerative clustering of the
                  pairwise cosine similarity of the updates dw_i = w_i - w^(0), cut at K clusters
                  (CFL's reference code runs scikit-learn's complete linkage on -similarity).

ResNet-18 has about 11 M parameters, so the N x P parameter matrix is never formed: both
alternatives only need the N x N Gram matrix, accumulated tensor by tensor in float64. K-means
depends on the points only through their Euclidean distances, so it is run on an exact
isometric embedding of the N points in R^N (classical multidimensional scaling of the Gram
matrix), which gives the same partition as K-means on the raw parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import INFO

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering
from torch import Tensor, nn

from ..logging_utils import log
from .clustering import kmeans_labels
from .config import CLUSTER_ON


def initial_model_state(factory: Callable[[], nn.Module], seed: int) -> dict[str, Tensor]:
    """w^(0): the model ``factory()`` builds right after ``torch.manual_seed(seed)``.

    This is how :func:`fedbicross_flwr.model.initial_state` makes the common initial model the
    server sends with ``train`` (there with ``build_resnet18`` and the run's ``seed``), so the
    server can rebuild it without storing it. The caller's global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: value.detach().clone() for name, value in factory().state_dict().items()}


def _float_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Trainable parameters (BN running statistics and counters excluded)."""
    return [(name, p.detach()) for name, p in model.named_parameters()]


def parameter_gram(
    models: Sequence[nn.Module], reference: Mapping[str, Tensor] | None = None
) -> np.ndarray:
    """(N, N) Gram matrix <v_i, v_j> of the flattened parameters, v_i = w_i - reference.

    Parameters
    ----------
    models : Sequence[nn.Module]
        The N client models (same architecture).
    reference : Mapping[str, Tensor], optional
        A state dict subtracted from every model (w^(0) for the updates); None: v_i = w_i.

    Returns
    -------
    np.ndarray
        (N, N) float64, symmetric positive semi-definite.
    """
    named = [_float_parameters(m) for m in models]
    n = len(models)
    gram = torch.zeros((n, n), dtype=torch.float64)
    for index, (name, _) in enumerate(named[0]):
        rows = []
        for params in named:
            value = params[index][1].to("cpu", torch.float64).flatten()  # (P_l,)
            if reference is not None:
                value = value - reference[name].to(torch.float64).flatten()
            rows.append(value)
        block = torch.stack(rows)  # (N, P_l)
        gram += block @ block.T
    return gram.numpy()


def isometric_embedding(gram: np.ndarray) -> np.ndarray:
    """(N, N) points with the same pairwise Euclidean distances as the Gram matrix's vectors.

    Classical MDS: centre the Gram matrix (B = J G J, J = I - 11^T/N), eigendecompose
    B = U diag(l) U^T and return U diag(sqrt(max(l, 0))). ||y_i - y_j|| = ||v_i - v_j|| exactly
    (up to rounding), so K-means (which only uses distances) partitions both alike.
    """
    n = gram.shape[0]
    centring = np.eye(n) - np.full((n, n), 1.0 / n)
    centred = centring @ gram @ centring
    eigenvalues, eigenvectors = np.linalg.eigh((centred + centred.T) / 2)
    return eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))[None, :]


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """(N, N) cosine similarity cos(v_i, v_j) from the Gram matrix (zero vectors: 0)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denominator = np.outer(norms, norms)
    return np.divide(gram, denominator, out=np.zeros_like(gram), where=denominator > 1e-30)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Clusters numbered by their smallest client (client 0 is in cluster 0)."""
    mapping: dict[int, int] = {}
    for label in labels:
        mapping.setdefault(int(label), len(mapping))
    return np.array([mapping[int(label)] for label in labels], dtype=np.int64)


def hierarchical_update_clusters(gram_updates: np.ndarray, num_clusters: int) -> np.ndarray:
    """CFL-style clustering: complete linkage on the cosine distance 1 - cos(dw_i, dw_j).

    Complete linkage merges the pair of groups whose LEAST similar members are the most
    similar, so at the cut the maximum cross-cluster similarity is as small as the greedy merge
    order allows (CFL's bipartition criterion, applied until K clusters remain).

    Parameters
    ----------
    gram_updates : np.ndarray
        (N, N) Gram matrix of the updates dw_i = w_i - w^(0).
    num_clusters : int
        K, 1 <= K <= N.

    Returns
    -------
    np.ndarray
        (N,) int64 labels 0..K-1, numbered by smallest client.
    """
    n = gram_updates.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, N={n}], got {num_clusters}")
    if num_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    if num_clusters == n:
        return np.arange(n, dtype=np.int64)
    distance = np.clip(1.0 - cosine_from_gram(gram_updates), 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    labels = AgglomerativeClustering(n_clusters=num_clusters, metric="precomputed",
                                     linkage="complete").fit(distance).labels_
    return _renumber(labels)


def assign_clusters(
    cluster_on: str,
    clients: Sequence[nn.Module],
    preds: np.ndarray,
    num_clusters: int,
    seed: int,
    n_init: int,
    factory: Callable[[], nn.Module],
) -> np.ndarray:
    """Cluster assignment of the N clients by the chosen signal.

    Parameters
    ----------
    cluster_on : str
        'predictions', 'parameters' or 'hierarchical' (see the module docstring).
    clients : Sequence[nn.Module]
        The N client models f_i.
    preds : np.ndarray
        (N, M * C) noise prediction matrices (used by 'predictions').
    num_clusters : int
        K.
    seed : int
        K-means seed, and the seed w^(0) was built with ('hierarchical').
    n_init : int
        K-means restarts.
    factory : callable
        Builds the client architecture; with ``seed`` it rebuilds w^(0) ('hierarchical').

    Returns
    -------
    np.ndarray
        (N,) int64 cluster of each client, 0..K-1, each used, numbered by smallest client.
    """
    if cluster_on == "predictions":
        return kmeans_labels(preds, num_clusters, seed, n_init=n_init)
    if cluster_on == "parameters":
        embedding = isometric_embedding(parameter_gram(clients))  # (N, N)
        labels = kmeans_labels(embedding, num_clusters, seed, n_init=n_init)
    elif cluster_on == "hierarchical":
        w0 = initial_model_state(factory, seed)
        labels = hierarchical_update_clusters(parameter_gram(clients, w0), num_clusters)
    else:
        raise ValueError(f"cluster_on must be one of {CLUSTER_ON}, got {cluster_on!r}")
    log(INFO, "clustering on %s: %s", cluster_on, labels.tolist())
    return labels
