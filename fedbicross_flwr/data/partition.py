"""Seeded non-IID client partitions and the two evaluation views.

* Training data: per-class Dirichlet(alpha) over clients (NIID-Bench style), computed by
  flwr-datasets' :class:`~flwr_datasets.partitioner.DirichletPartitioner` on the official train
  split, then a client-local validation split carved from each partition (stratified where
  possible). Never select a model by test accuracy: validation is the client's own.
* Evaluation view 1 (the paper's headline): every client's final model on the OFFICIAL test
  split; the mean over clients is the paper's metric.
* Evaluation view 2 (personalized-FL): the official test split divided class by class among
  clients in proportion to their share of that class in training, so a client's test
  proportions follow its training proportions; the per-client test sets are disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class ClientSplit:
    """Indices of one client's data into the official splits."""

    partition_id: int
    train_idx: np.ndarray  # into the official train split, used for local training
    val_idx: np.ndarray  # into the official train split, client-local validation
    personal_test_idx: np.ndarray  # into the official test split (evaluation view 2)


class PartitionError(ValueError):
    """The training split cannot be partitioned as the run config asks."""


def dirichlet_partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int,
                        min_partition_size: int) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) partition of ``labels`` into ``num_partitions`` parts.

    Every index lands in exactly one partition.

    Raises
    ------
    PartitionError
        The split is empty, has fewer samples than ``num_partitions`` x
        ``min_partition_size``, or no draw reaches ``min_partition_size`` after 10 attempts
        (flwr-datasets' error, rephrased).
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    what = (f"{len(labels)} training samples into {num_partitions} clients (alpha={alpha}, "
            f"min-partition-size={min_partition_size})")
    if len(labels) == 0:
        raise PartitionError("the training split is empty: there is nothing to partition")
    if num_partitions == 1:
        return [np.arange(len(labels))]
    if len(labels) < num_partitions * max(min_partition_size, 1):
        raise PartitionError(f"cannot partition {what}: every client needs at least "
                             f"max(min-partition-size, 1) samples; use at most "
                             f"{len(labels) // max(min_partition_size, 1)} clients or lower "
                             "min-partition-size")
    table = datasets.Dataset.from_dict({"label": labels.astype(np.int64),
                                        "idx": np.arange(len(labels))})
    try:
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                           alpha=alpha, min_partition_size=min_partition_size,
                                           self_balancing=False, shuffle=True, seed=seed)
        partitioner.dataset = table
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
                 for i in range(num_partitions)]
    except ValueError as err:
        raise PartitionError(f"Dirichlet partition failed for {what}: {err} Lower "
                             "min-partition-size or use fewer clients.") from err
    return parts


def split_validation(idx: np.ndarray, labels: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of ``idx`` per class (at least one sample of a class with >= 2).

    Returns (train_idx, val_idx), both sorted.
    """
    if fraction <= 0 or len(idx) < 2:
        return np.sort(idx), np.zeros(0, dtype=np.int64)
    val = []
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        n_val = int(round(fraction * len(members)))
        if n_val == 0 and len(members) >= 2 and fraction > 0:
            n_val = 1 if rng.random() < fraction * len(members) else 0
        val.extend(members[:n_val].tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(idx, val_idx)
    if len(train_idx) == 0:  # never leave a client without training data
        return np.sort(idx), np.zeros(0, dtype=np.int64)
    return train_idx, val_idx


def personal_test_split(train_parts: list[np.ndarray], train_labels: np.ndarray,
                        test_labels: np.ndarray, num_classes: int,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Divide the test split class by class with the clients' training shares.

    For class c, client i receives round(T_c * n_ic / N_c) of the T_c test samples of class c
    (largest-remainder rounding so the counts add up to T_c), where n_ic is its number of
    training samples of class c and N_c = sum_i n_ic.
    """
    counts = np.stack([np.bincount(train_labels[p], minlength=num_classes)
                       for p in train_parts])  # (N, C)
    out: list[list[int]] = [[] for _ in train_parts]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(test_labels == c))
        total = counts[:, c].sum()
        if total == 0 or len(members) == 0:
            continue
        quota = len(members) * counts[:, c] / total
        take = np.floor(quota).astype(int)
        remainder = len(members) - take.sum()
        if remainder:
            order = np.argsort(-(quota - take), kind="stable")
            take[order[:remainder]] += 1
        start = 0
        for i, n in enumerate(take):
            out[i].extend(members[start:start + n].tolist())
            start += n
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out]


def make_client_splits(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int,
                       num_partitions: int, alpha: float, seed: int, val_fraction: float,
                       min_partition_size: int) -> list[ClientSplit]:
    """All clients' splits; the same arguments always give the same result."""
    return list(_cached_splits(train_labels.tobytes(), test_labels.tobytes(), num_classes,
                               num_partitions, float(alpha), int(seed), float(val_fraction),
                               int(min_partition_size)))


@lru_cache(maxsize=8)
def _cached_splits(train_bytes: bytes, test_bytes: bytes, num_classes: int,
                   num_partitions: int, alpha: float, seed: int, val_fraction: float,
                   min_partition_size: int) -> tuple[ClientSplit, ...]:
    train_labels = np.frombuffer(train_bytes, dtype=np.int64)
    test_labels = np.frombuffer(test_bytes, dtype=np.int64)
    parts = dirichlet_partition(train_labels, num_partitions, alpha, seed, min_partition_size)
    rng = np.random.default_rng(seed + 1)
    train_val = [split_validation(p, train_labels, val_fraction, rng) for p in parts]
    personal = personal_test_split(parts, train_labels, test_labels, num_classes,
                                   np.random.default_rng(seed + 2))
    return tuple(ClientSplit(i, tv[0], tv[1], personal[i])
                 for i, tv in enumerate(train_val))


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    """Counts per class (for logs and results)."""
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()
