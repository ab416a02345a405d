"""A client's data in simulation (partition) and in deployment (its own archive)."""

from __future__ import annotations

import pytest
import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import DataError
from fedbicross_flwr.data.site import load_site, to_tensors
from tests.conftest import make_archive


def test_to_tensors_normalises_to_minus_one_one() -> None:
    import numpy as np

    x, y = to_tensors(np.array([[[0, 255]]], dtype=np.uint8).repeat(28, 1).repeat(14, 2)
                      [:, :28, :28], np.array([2]))
    assert x.shape == (1, 1, 28, 28) and x.min() == -1.0 and x.max() == 1.0
    x3, _ = to_tensors(np.zeros((2, 28, 28, 3), dtype=np.uint8), np.array([0, 1]))
    assert x3.shape == (2, 3, 28, 28)


def test_deployment_site_reads_its_own_archive(tmp_path) -> None:
    path = make_archive(tmp_path / "hospital.npz", in_channels=3, num_classes=4)
    cfg = RunConfig.from_run_config({"dataset": "custom", "data-path": "/unused.npz",
                                     "in-channels": 3, "num-classes": 4})
    site = load_site(cfg, {"data-path": str(path), "partition-id": 7})
    assert site.partition_id == 7 and site.in_channels == 3
    assert site.n_train == 60 and len(site.y_val) == 12 and len(site.y_test) == 30
    assert torch.equal(site.y_test, site.y_test_personal)  # a site's own test set
    assert site.x_train.shape == (60, 3, 28, 28)


def test_deployment_site_errors_name_the_problem(tmp_path) -> None:
    cfg = RunConfig.from_run_config({"dataset": "custom", "data-path": "/x.npz",
                                     "in-channels": 1, "num-classes": 3})
    with pytest.raises(DataError, match="site data archive not found"):
        load_site(cfg, {"data-path": str(tmp_path / "missing.npz")})
    rgb = make_archive(tmp_path / "rgb.npz", in_channels=3, num_classes=3)
    with pytest.raises(DataError, match="expected \\(28, 28\\)"):
        load_site(cfg, {"data-path": str(rgb)})
    with pytest.raises(DataError, match="partition-id and num-partitions"):
        load_site(cfg, {})


def test_simulation_site_is_the_clients_partition(tiny_run_config) -> None:
    cfg = RunConfig.from_run_config(tiny_run_config)
    sites = [load_site(cfg, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    assert sum(s.n_train + len(s.y_val) for s in sites) == 60
    assert all(len(s.y_test) == 30 for s in sites)  # the official test split, for everyone
    assert sum(len(s.y_test_personal) for s in sites) == 30
