"""Clustering ablations (cluster-on): planted groups of clients trained on disjoint labels."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.fedbicross.clustering_alternatives import (
    assign_clusters,
    hierarchical_update_clusters,
    initial_model_state,
    isometric_embedding,
    parameter_gram,
)
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross
from fedbicross_flwr.model import build_resnet18, initial_state
from tests.tiny_models import TinyCNN

SEED = 7


def _factory() -> TinyCNN:
    return TinyCNN(in_channels=1, num_classes=4, width=6)


def _images(label: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Noise with a bright band whose row depends on the label (learnable, class-specific)."""
    x = torch.randn((n, 1, 12, 12), generator=gen) * 0.3
    x[:, :, 3 * label: 3 * label + 2] += 2.0
    return x


def _train_client(labels: list[int], seed: int) -> TinyCNN:
    """A client trained from the common w^(0) on its own labels only."""
    model = _factory()
    model.load_state_dict(initial_model_state(_factory, SEED))
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([_images(c, 16, gen) for c in labels])
    y = torch.cat([torch.full((16,), c) for c in labels])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(30):
        idx = torch.randperm(len(x), generator=gen)[:16]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def planted_clients():
    # clients 0, 2 know labels {0, 1}; clients 1, 3 know labels {2, 3}
    groups = {0: [0, 1], 1: [2, 3], 2: [0, 1], 3: [2, 3]}
    return [_train_client(groups[i], seed=100 + i) for i in range(4)]


@pytest.mark.parametrize("cluster_on", ["parameters", "hierarchical"])
def test_alternatives_recover_planted_groups(planted_clients, cluster_on):
    labels = assign_clusters(cluster_on, planted_clients, np.zeros((4, 1)), 2, SEED, 5, _factory)
    assert labels.tolist() == [0, 1, 0, 1]


def test_hierarchical_uses_cosine_of_updates_not_their_length():
    # Prepare: updates along two orthogonal directions, very different lengths within a group
    u, v = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    updates = np.stack([u, 10 * v + 0.1 * u, 20 * u, v])  # groups {0, 2} and {1, 3}
    # Execute
    labels = hierarchical_update_clusters(updates @ updates.T, 2)
    # Assert: by Euclidean distance 0 would join 3; by cosine the planted groups come out
    assert labels.tolist() == [0, 1, 0, 1]


def test_isometric_embedding_keeps_every_pairwise_distance(planted_clients):
    flat = np.stack([torch.cat([p.detach().flatten() for p in m.parameters()]).double().numpy()
                     for m in planted_clients])  # (N, P)
    emb = isometric_embedding(parameter_gram(planted_clients))  # (N, N)
    direct = np.linalg.norm(flat[:, None] - flat[None], axis=2)
    via_embedding = np.linalg.norm(emb[:, None] - emb[None], axis=2)
    np.testing.assert_allclose(via_embedding, direct, atol=1e-6)


def test_w0_rebuilt_on_the_server_equals_the_clients_initial_model():
    cfg = RunConfig.from_run_config({"seed": 3})
    sent = initial_state(cfg, 1, 3)
    rebuilt = initial_model_state(lambda: build_resnet18(1, 3), cfg.seed)
    assert sent.keys() == rebuilt.keys()
    assert all(torch.equal(sent[k], rebuilt[k]) for k in sent)


def test_run_fedbicross_clusters_on_the_chosen_signal(planted_clients):
    # The noise predictions of these clients need not separate the groups; parameters do.
    settings = FedBiCrossSettings(num_clusters=2, cluster_on="hierarchical", seed=SEED,
                                  noise_samples=4, synth_steps=1, synth_batch=4, num_examples=2,
                                  kmeans_n_init=2)
    result = run_fedbicross(planted_clients, 1, 4, settings, "cpu", progress=False,
                            student_factory=_factory, image_size=12)
    assert result.assignment.tolist() == [0, 1, 0, 1]


def test_cluster_on_is_validated_with_its_key():
    with pytest.raises(ConfigError, match="cluster-on"):
        RunConfig.from_run_config({"cluster-on": "pacfl"})
    with pytest.raises(ConfigError, match="cluster-on"):
        FedBiCrossSettings(cluster_on="pacfl")
