"""``cluster-fedavg``, the null row of FedBiCross's server stage: the same clusters, averaged."""

from __future__ import annotations

import numpy as np
import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.methods.base import ClientUpload, MethodInput
from fedbicross_flwr.methods.cluster_fedavg import cluster_fedavg
from fedbicross_flwr.methods.fedbicross import fedbicross
from fedbicross_flwr.model import build_resnet18


def _uploads() -> list[ClientUpload]:
    """Five width-8 client models that differ (seeds, BN statistics) and unequal data sizes."""
    uploads = []
    for i in range(5):
        torch.manual_seed(100 + i)
        model = build_resnet18(1, 3, 8)
        with torch.no_grad():
            model.fc.bias.copy_(torch.tensor([3.0, 0.0, 0.0]) if i < 2 else
                                torch.tensor([0.0, 0.0, 3.0]))
        uploads.append(ClientUpload(i, {k: v.detach().clone() for k, v in
                                        model.state_dict().items()}, 10 + 7 * i))
    return uploads


def _input(tmp_path, name: str, **overrides) -> MethodInput:
    cfg = RunConfig.from_run_config({"method": name, "model-width": 8, "num-clusters": 2,
                                     "noise-samples": 16, "synth-steps": 2, "synth-batch": 8,
                                     "progress": False, **overrides})
    run_dir = tmp_path / name
    run_dir.mkdir()
    return MethodInput(_uploads(), cfg, 1, 3, torch.device("cpu"), run_dir)


def test_same_clusters_as_fedbicross_and_the_weighted_average_of_each(tmp_path) -> None:
    null = cluster_fedavg(_input(tmp_path, "cluster-fedavg"))
    ours = fedbicross(_input(tmp_path, "fedbicross"))
    assert null.clusters == ours.clusters
    assert sorted(set(null.clusters.values())) == [0, 1]
    uploads = _uploads()
    for pid, cluster in null.clusters.items():
        members = [u for u in uploads if null.clusters[u.partition_id] == cluster]
        sizes = np.array([u.num_examples for u in members], dtype=np.float64)
        for key in ("conv1.weight", "layer3.1.bn2.running_var", "fc.bias"):
            expected = sum(s * u.state[key].double().numpy() for s, u in zip(sizes, members))
            np.testing.assert_allclose(null.models[pid][key].double().numpy(),
                                       expected / sizes.sum(), rtol=1e-6, atol=1e-7)
    assert (tmp_path / "cluster-fedavg" / "clusters.csv").read_text().count("\n") == 6


def test_it_is_fedbicross_cluster_average_start(tmp_path) -> None:
    """The null row sends what FedBiCross's G_k^(0) is under student-init=cluster-average."""
    from fedbicross_flwr.fedbicross import method as core

    starts = []
    real = core.OnlineBilevelTrainer

    def spy(students, *args, **kwargs):
        starts.extend({k: v.detach().clone() for k, v in s.state_dict().items()}
                      for s in students)
        return real(students, *args, **kwargs)

    null = cluster_fedavg(_input(tmp_path, "cluster-fedavg"))
    core.OnlineBilevelTrainer = spy
    try:
        fedbicross(_input(tmp_path, "fedbicross",
                                        **{"student-init": "cluster-average"}))
    finally:
        core.OnlineBilevelTrainer = real
    for pid, cluster in null.clusters.items():
        for key, value in null.models[pid].items():
            assert torch.allclose(value.double(), starts[cluster][key].double(), atol=1e-6), key
