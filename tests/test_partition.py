"""Dirichlet partition, local validation and the label-following test split."""

from __future__ import annotations

import numpy as np

from fedbicross_flwr.data.datasets import load_digits_dataset
from fedbicross_flwr.data.partition import dirichlet_partition, make_client_splits


def _splits(alpha: float, seed: int = 0, n: int = 5):
    ds = load_digits_dataset()
    return ds, make_client_splits(ds.train.labels, ds.test.labels, 10, n, alpha, seed, 0.1, 5)


def test_same_seed_same_partition_other_seed_other_partition() -> None:
    _, a = _splits(0.5, seed=0)
    _, b = _splits(0.5, seed=0)
    _, c = _splits(0.5, seed=1)
    for x, y in zip(a, b):
        assert np.array_equal(x.train_idx, y.train_idx)
        assert np.array_equal(x.personal_test_idx, y.personal_test_idx)
    assert any(not np.array_equal(x.train_idx, z.train_idx) for x, z in zip(a, c))


def test_every_training_sample_in_exactly_one_client() -> None:
    ds, splits = _splits(0.1)
    allocated = np.concatenate([np.concatenate([s.train_idx, s.val_idx]) for s in splits])
    assert len(allocated) == len(ds.train)
    assert np.array_equal(np.sort(allocated), np.arange(len(ds.train)))
    test = np.concatenate([s.personal_test_idx for s in splits])
    assert len(np.unique(test)) == len(test)  # disjoint personal test sets


def test_personal_test_proportions_follow_training_proportions() -> None:
    ds, splits = _splits(0.3)
    for s in splits:
        part = np.concatenate([s.train_idx, s.val_idx])
        train_p = np.bincount(ds.train.labels[part], minlength=10) / len(part)
        test_p = np.bincount(ds.test.labels[s.personal_test_idx], minlength=10)
        test_p = test_p / test_p.sum()
        assert np.abs(train_p - test_p).max() < 0.05, (train_p, test_p)


def test_small_alpha_gives_skew() -> None:
    labels = np.repeat(np.arange(10), 100)

    def mean_top_share(alpha: float) -> float:
        parts = dirichlet_partition(labels, 5, alpha, seed=0, min_partition_size=5)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p)
                              for p in parts]))

    assert mean_top_share(0.1) > 0.4  # a few classes dominate each client
    assert mean_top_share(100.0) < 0.2  # close to the uniform 0.1


def test_validation_split_is_local_and_disjoint() -> None:
    _, splits = _splits(0.5)
    for s in splits:
        assert len(np.intersect1d(s.train_idx, s.val_idx)) == 0
        total = len(s.train_idx) + len(s.val_idx)
        assert 0.03 * total <= len(s.val_idx) <= 0.2 * total
