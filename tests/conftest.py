"""Shared fixtures: tiny MedMNIST-format archives, a tiny run config, Flower task identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedbicross_flwr.data.datasets import ArraySplit, DatasetArrays, write_npz


def inprocess_config(tmp: Path, name: str, **extra) -> dict:
    """The run config of a tiny fedavg1 run over the in-process Grid in ``tmp``/runs/``name``
    (``extra`` adds the data path and overrides).
    """
    return {
        "dataset": "custom", "in-channels": 1, "num-classes": 3, "alpha": 1.0,
        "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1, "batch-size": 16,
        "local-lr": 0.01, "output-dir": str(tmp / "runs"), "run-name": name,
        "progress": False, "node-wait-timeout": 0.0, "device": "cpu", "min-clients": 2,
        "method": "fedavg1", **extra}


def make_archive(path: Path, in_channels: int = 1, num_classes: int = 3,
                 n_train: int = 60, n_val: int = 12, n_test: int = 30, seed: int = 0) -> Path:
    """A small archive in exactly the MedMNIST npz format, with learnable class patterns."""
    rng = np.random.default_rng(seed)
    shape = (28, 28) if in_channels == 1 else (28, 28, 3)

    def split(n: int) -> ArraySplit:
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
        for i, c in enumerate(labels):  # class c: a bright horizontal band at rows 8c..8c+5
            images[i, 8 * c: 8 * c + 5] = 230
        return ArraySplit(images, labels.astype(np.int64))

    ds = DatasetArrays("tiny", in_channels, num_classes, split(n_train), split(n_val),
                       split(n_test))
    return write_npz(ds, path)


@pytest.fixture
def tiny_archive(tmp_path: Path) -> Path:
    return make_archive(tmp_path / "site.npz")


@pytest.fixture
def tiny_run_config(tiny_archive: Path, tmp_path: Path) -> dict:
    """Kebab-case run config for a 3-client run that takes seconds."""
    return {
        "dataset": "custom", "data-path": str(tiny_archive), "in-channels": 1,
        "num-classes": 3, "num-clients": 3, "alpha": 1.0, "min-partition-size": 5,
        "local-epochs": 1, "pers-epochs": 1, "batch-size": 16, "local-lr": 0.01,
        "output-dir": str(tmp_path / "runs"), "run-name": "test", "progress": False,
        "node-wait-timeout": 0.0,
    }


@pytest.fixture(autouse=True)
def _flower_task_identity() -> None:
    """Building a Message outside a Flower run needs the task identity set (flwr 1.42)."""
    try:
        from fedbicross_flwr.transports.task_identity import set_task_identity
    except ImportError:  # pragma: no cover
        return
    set_task_identity(1)


@pytest.fixture
def deployment(tmp_path: Path):
    """A loopback federation's processes (tests/test_deploy_loopback.py), stopped at the end."""
    from fedbicross_flwr.runners.simulation import processes_of
    from tests.test_deploy_loopback import Deployment

    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()
        # Assert: nothing this test started is still running
        assert [processes_of(h) for h in dep.homes] == [[] for _ in dep.homes]


# Fuzz tests (hypothesis): one fixed seed and a recorded example database in the repository,
# so CI replays the same examples on every machine and a found failure is kept as an example.
from hypothesis import settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

settings.register_profile(  # the seed is pytest's --hypothesis-seed=0 (pyproject.toml)
    "fedbicross", deadline=None, max_examples=60, print_blob=True,
    database=DirectoryBasedExampleDatabase(str(Path(__file__).parent / "hypothesis-examples")))
settings.load_profile("fedbicross")
