"""Privacy guard: what leaves a client is its model's parameters and buffers, metrics and its
partition-id; never images, labels or anything else.

The uploads are checked against an INDEPENDENT re-training with the client code (same seed,
CPU): the arrays a client sends must be exactly the trained model's ``state_dict`` (names,
shapes, dtypes, values), so no extra tensor can ride along under a model's name.
"""

from __future__ import annotations

import numbers

import pytest
import torch

from fedbicross_flwr.client import run_local_training
from fedbicross_flwr.config import RunConfig
from fedbicross_flwr.inprocess import run_in_process
from fedbicross_flwr.site import load_site

ALLOWED = {"train": {"arrays", "metrics", "config"},
           "train.personalize": {"metrics", "config"}}


@pytest.fixture(scope="module")
def grid_and_config(tmp_path_factory):
    from tests.conftest import make_archive

    tmp = tmp_path_factory.mktemp("privacy")
    run_config = {
        "dataset": "custom", "data-path": str(make_archive(tmp / "site.npz")),
        "in-channels": 1, "num-classes": 3, "num-clients": 3, "alpha": 1.0,
        "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1, "batch-size": 16,
        "local-lr": 0.01, "output-dir": str(tmp / "runs"), "run-name": "privacy",
        "progress": False, "node-wait-timeout": 0.0, "device": "cpu",
    }
    grid, _ = run_in_process(run_config, num_nodes=3)
    return grid, run_config


def test_every_reply_holds_only_the_allowed_records(grid_and_config) -> None:
    grid, _ = grid_and_config
    assert len(grid.replies) == 6  # 3 uploads + 3 personalization reports
    for reply in grid.replies:
        kind = reply.metadata.message_type
        assert not reply.has_error()
        assert set(reply.content.keys()) == ALLOWED[kind], kind
        # config: the partition-id and nothing else
        assert set(reply.content["config"].keys()) == {"partition-id"}
        # metrics: scalar numbers only (no lists that could carry per-sample values)
        for name, value in reply.content["metrics"].items():
            assert isinstance(value, numbers.Real) and not isinstance(value, bool), name
        # no other record type anywhere in the reply
        assert reply.content.array_records.keys() <= {"arrays"}
        assert set(reply.content.config_records) == {"config"}


def test_uploaded_arrays_are_exactly_the_trained_models_state(grid_and_config) -> None:
    grid, run_config = grid_and_config
    cfg = RunConfig.from_run_config(run_config)
    init = next(m for m in grid.sent if m.metadata.message_type == "train")
    init_state = init.content["arrays"].to_torch_state_dict()
    uploads = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(uploads) == 3
    for reply in uploads:
        pid = int(reply.content["config"]["partition-id"])
        sent = reply.content["arrays"].to_torch_state_dict()
        # Execute: the same client trained again, independently of the ClientApp
        site = load_site(cfg, {"partition-id": pid, "num-partitions": 3})
        model, _ = run_local_training(cfg, site, torch.device("cpu"), init_state)
        expected = model.state_dict()
        # Assert: same names in the same order, same shapes, dtypes and values
        assert list(sent) == list(expected)
        for name, tensor in expected.items():
            assert sent[name].dtype == tensor.dtype, name
            assert torch.equal(sent[name], tensor), name
        # and none of them is shaped like the site's images or labels
        data_shapes = {tuple(site.x_train.shape), tuple(site.y_train.shape),
                       tuple(site.x_test.shape), tuple(site.y_test.shape)}
        assert not {tuple(t.shape) for t in sent.values()} & data_shapes
