"""A client's local data, the same for simulation and deployment.

* Simulation: ``node_config`` has ``partition-id`` / ``num-partitions``; the client loads the
  dataset the run config names and takes its seeded Dirichlet partition.
* Deployment: ``node_config`` has ``data-path`` (the site's own MedMNIST-format npz, official
  or not) and optionally ``partition-id`` (a stable site number for the results). The site's
  whole train split is its training data (minus a local validation share); its own test split
  serves both evaluation views.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from fedbicross_flwr.data.datasets import (
    REBUILT,
    DataError,
    DatasetArrays,
    load_dataset,
    load_medmnist,
    load_npz_archive,
    md5sum,
)
from fedbicross_flwr.data.partition import make_client_splits, split_validation
from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.logging_utils import log


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 28, 28[, 3]) -> float (N, C, 28, 28) normalised with mean 0.5 / std 0.5."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.sub_(0.5).div_(0.5).contiguous()
    return x, torch.from_numpy(np.ascontiguousarray(labels)).long()


@dataclass
class SiteData:
    """Tensors of one client (all on the CPU; training moves batches to the device)."""

    partition_id: int
    in_channels: int
    num_classes: int
    x_train: torch.Tensor  # (n_train, C, 28, 28)
    y_train: torch.Tensor  # (n_train,)
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor  # official test split (evaluation view 1)
    y_test: torch.Tensor
    x_test_personal: torch.Tensor  # label-following test split (evaluation view 2)
    y_test_personal: torch.Tensor

    @property
    def n_train(self) -> int:
        """Number of local training examples."""
        return int(self.y_train.shape[0])

    def label_histogram(self) -> list[int]:
        """Local training examples per class (length ``num_classes``)."""
        return torch.bincount(self.y_train, minlength=self.num_classes).tolist()


def site_partition_id(node_config: Mapping[str, Any]) -> int | None:
    """The partition-id a node reports, read from its node config alone (no data loaded).

    Deployment nodes without one are site 0 (as in :func:`load_site`); a node config with
    neither ``partition-id`` nor ``data-path``, or an unparsable id, gives None.
    """
    deployment = bool(str(node_config.get("data-path", "")))
    raw = node_config.get("partition-id", 0 if deployment else None)
    try:
        return None if raw is None else int(raw)
    except (TypeError, ValueError):
        return None


def assigned_node_config(node_config: Mapping[str, Any],
                         instruction: Mapping[str, Any]) -> Mapping[str, Any]:
    """The node config a client works with, given the server's instruction config.

    In simulation the server assigns the partitions (its instruction carries ``partition-id``
    and ``num-partitions``) and binds each to the node it sends it to, so the node trains that
    partition and answers for it. A deployment site (``data-path``) keeps its own data and its
    own partition-id; the server checks it against its ``site-nodes``.
    """
    if str(node_config.get("data-path", "")):
        return node_config
    if "partition-id" in instruction and "num-partitions" in instruction:
        return {**node_config, "partition-id": int(instruction["partition-id"]),
                "num-partitions": int(instruction["num-partitions"])}
    return node_config


def load_site(cfg: SharedConfig, node_config: Mapping[str, Any]) -> SiteData:
    """Build a client's :class:`SiteData` from the run config and its node config.

    Raises
    ------
    DataError
        The node config is incomplete, or the site's archive is missing/corrupt/invalid.
    """
    if "data-path" in node_config and str(node_config["data-path"]):
        return _deployment_site(cfg, node_config)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise DataError("node config needs partition-id and num-partitions (simulation) or "
                        f"data-path (deployment); got {dict(node_config)}")
    pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= pid < n:
        raise DataError(f"partition-id {pid} out of range for num-partitions {n}")
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                      cfg.in_channels, cfg.num_classes)
    return site_from_partition(ds, cfg, pid, n)


def site_from_partition(ds: DatasetArrays, cfg: SharedConfig, pid: int, n: int) -> SiteData:
    """Client ``pid`` of ``n`` under the run config's Dirichlet partition."""
    splits = make_client_splits(ds.train.labels, ds.test.labels, ds.num_classes, n, cfg.alpha,
                                cfg.seed, cfg.val_fraction, cfg.min_partition_size)
    s = splits[pid]
    x_tr, y_tr = to_tensors(ds.train.images[s.train_idx], ds.train.labels[s.train_idx])
    x_va, y_va = to_tensors(ds.train.images[s.val_idx], ds.train.labels[s.val_idx])
    x_te, y_te = _official_test(ds)
    x_pt, y_pt = to_tensors(ds.test.images[s.personal_test_idx],
                            ds.test.labels[s.personal_test_idx])
    return SiteData(pid, ds.in_channels, ds.num_classes, x_tr, y_tr, x_va, y_va, x_te, y_te,
                    x_pt, y_pt)


def partition_sizes(cfg: SharedConfig, n: int) -> dict[int, int]:
    """Training-set size of each of the ``n`` simulation partitions (what clients report as
    num-examples), or {} when this process cannot read the dataset.
    """
    try:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                          cfg.in_channels, cfg.num_classes)
        splits = make_client_splits(ds.train.labels, ds.test.labels, ds.num_classes, n,
                                    cfg.alpha, cfg.seed, cfg.val_fraction,
                                    cfg.min_partition_size)
    except (DataError, ValueError):
        return {}
    return {pid: len(s.train_idx) for pid, s in enumerate(splits)}


def example_bounds(cfg: SharedConfig, num_partitions: int) -> dict[int, int]:
    """The most training examples each partition can have (bounds on num-examples).

    In simulation (``num_partitions`` > 0: the clients trained the server's partitions) the
    server recomputes each partition's size; ``max-num-examples`` > 0 replaces them by one
    bound. Otherwise the sample counts cannot be checked, which is logged.
    """
    if cfg.max_num_examples:
        return {}
    sizes = partition_sizes(cfg, num_partitions) if num_partitions else {}
    if not sizes:
        log(logging.WARNING, "num-examples reported by the clients cannot be checked "
            "(no server-side partition); set max-num-examples to bound them")
    return sizes


# The official test tensors are the same for every client of a process: build them once.
# The dataset object itself is kept, so an identity check cannot match a different dataset.
_TEST_CACHE: list[tuple[DatasetArrays, tuple[torch.Tensor, torch.Tensor]]] = []


def _official_test(ds: DatasetArrays) -> tuple[torch.Tensor, torch.Tensor]:
    if not _TEST_CACHE or _TEST_CACHE[0][0] is not ds:
        _TEST_CACHE[:] = [(ds, to_tensors(ds.test.images, ds.test.labels))]
    return _TEST_CACHE[0][1]


def _deployment_site(cfg: SharedConfig, node_config: Mapping[str, Any]) -> SiteData:
    path = Path(str(node_config["data-path"])).expanduser()
    pid = site_partition_id(node_config)
    if pid is None:
        raise DataError(f"node config partition-id {node_config.get('partition-id')!r} is not "
                        "an integer")
    ds = _load_site_archive(cfg, path)
    rng = np.random.default_rng(cfg.seed + 1000 + pid)
    idx = np.arange(len(ds.train))
    if len(ds.val):  # the archive brings its own validation split
        tr_idx, x_va, y_va = idx, *to_tensors(ds.val.images, ds.val.labels)
    else:
        tr_idx, va_idx = split_validation(idx, ds.train.labels, cfg.val_fraction, rng)
        x_va, y_va = to_tensors(ds.train.images[va_idx], ds.train.labels[va_idx])
    if len(tr_idx) < 2 or len(ds.test) == 0:
        raise DataError(f"site data archive {path} has {len(tr_idx)} training and "
                        f"{len(ds.test)} test images; at least 2 and 1 are needed")
    x_tr, y_tr = to_tensors(ds.train.images[tr_idx], ds.train.labels[tr_idx])
    x_te, y_te = to_tensors(ds.test.images, ds.test.labels)
    return SiteData(pid, ds.in_channels, ds.num_classes, x_tr, y_tr, x_va, y_va, x_te, y_te,
                    x_te, y_te)


def _load_site_archive(cfg: SharedConfig, path: Path) -> DatasetArrays:
    """An official MedMNIST file (recognised by md5) or a custom archive."""
    if not path.is_file():
        raise DataError(f"site data archive not found: {path} (node config data-path)")
    if cfg.dataset not in ("custom", "digits"):
        import medmnist

        info = medmnist.INFO.get(cfg.dataset)
        if info is not None and md5sum(path) == info["MD5"] and path.name == f"{cfg.dataset}.npz":
            return load_medmnist(cfg.dataset, path.parent)
    in_ch, n_cls = cfg.in_channels, cfg.num_classes
    if not (in_ch and n_cls) and cfg.dataset not in ("custom",):
        # a site's own archive of a known dataset: shape from the dataset's metadata
        if cfg.dataset == "digits":
            in_ch, n_cls = in_ch or 1, n_cls or 10
        elif cfg.dataset in REBUILT:
            rebuilt = REBUILT[cfg.dataset]
            in_ch, n_cls = in_ch or rebuilt.in_channels, n_cls or rebuilt.num_classes
        else:
            import medmnist

            info = medmnist.INFO.get(cfg.dataset)
            if info is not None:
                in_ch, n_cls = in_ch or int(info["n_channels"]), n_cls or len(info["label"])
    return load_npz_archive(path, in_ch, n_cls, name=path.stem, require_splits=("train", "test"))
