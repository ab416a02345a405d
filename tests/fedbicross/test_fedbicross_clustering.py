"""Stage 1 clustering: K-means on noise predictions recovers planted groups."""

import numpy as np
import pytest
import torch

from fedbicross_flwr.fedbicross.clustering import (
    cluster_centroids,
    degenerate_clients,
    kmeans_labels,
    noise_predictions,
    similarity_weights,
)
from tests.tiny_models import make_tiny


def _biased(seed: int, bias: list[float]):
    model = make_tiny(seed, num_classes=4)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor(bias))
    return model


def test_clustering_recovers_planted_label_groups():
    # Prepare: clients 0 and 2 favour classes {0, 1}, clients 1 and 3 favour {2, 3};
    # within a group the preferred class differs, and random weights add noise.
    models = [
        _biased(0, [2.0, 1.0, -2.0, -2.0]),
        _biased(1, [-2.0, -2.0, 2.0, 1.0]),
        _biased(2, [1.0, 2.0, -2.0, -2.0]),
        _biased(3, [-2.0, -2.0, 1.0, 2.0]),
    ]
    # Execute
    preds = noise_predictions(models, num_noise=16, in_channels=1, seed=0, device="cpu", image_size=6)
    labels = kmeans_labels(preds, num_clusters=2, seed=0)
    # Assert: shape (N, M*C), rows are softmax matrices, planted partition, cluster 0 has client 0
    assert preds.shape == (4, 16 * 4)
    assert np.allclose(preds.reshape(4, 16, 4).sum(axis=2), 1.0)
    assert labels.tolist() == [0, 1, 0, 1]


def test_noise_predictions_are_seeded_and_restore_modes():
    models = [make_tiny(0).train(), make_tiny(1)]
    a = noise_predictions(models, 8, 1, seed=3, device="cpu", image_size=5)
    b = noise_predictions(models, 8, 1, seed=3, device="cpu", image_size=5, batch_size=3)
    c = noise_predictions(models, 8, 1, seed=4, device="cpu", image_size=5)
    assert np.allclose(a, b) and not np.allclose(a, c)
    assert models[0].training and not models[1].training


def test_labels_are_numbered_by_smallest_client_and_stable_across_seeds():
    # Prepare: two obvious groups, group of client 0 listed second in feature space
    preds = np.array([[10.0, 0.0], [0.0, 0.0], [10.1, 0.0], [0.1, 0.0], [0.0, 0.1]])
    # Execute / Assert
    for seed in range(5):
        assert kmeans_labels(preds, 2, seed=seed).tolist() == [0, 1, 0, 1, 1]


def test_k_larger_than_n_raises_and_k1_is_all_zero():
    preds = np.random.default_rng(0).random((3, 4))
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans_labels(preds, 4, seed=0)
    assert kmeans_labels(preds, 1, seed=0).tolist() == [0, 0, 0]


def test_identical_outputs_still_give_k_non_empty_clusters_and_degenerate_detection():
    # Prepare: three clients that all predict class 1 on every one of 2 noise images (C = 2)
    preds = np.tile(np.array([0.1, 0.9, 0.2, 0.8]), (3, 1))
    # Execute
    labels = kmeans_labels(preds, 2, seed=0)
    # Assert
    assert sorted(set(labels.tolist())) == [0, 1]
    assert degenerate_clients(preds, num_classes=2) == [0, 1, 2]
    assert degenerate_clients(np.array([[0.9, 0.1, 0.2, 0.8]]), num_classes=2) == []


def test_similarity_weights_hand_computed():
    centroids = np.array([[1.0, 0.0], [1.0, 1.0]])
    c = 1 / np.sqrt(2)
    w = similarity_weights(centroids)
    assert np.allclose(w, [[1 / (1 + c), c / (1 + c)], [c / (1 + c), 1 / (1 + c)]])
    assert np.allclose(cluster_centroids(np.array([[1.0], [3.0], [5.0]]), np.array([0, 0, 1]), 2), [[2.0], [5.0]])
