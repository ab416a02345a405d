"""``central``: the upper bound every table row is measured against (simulation only).

One ResNet-18 is trained on the POOLED training data of the clients that took part (the union
of their partitions' training splits, client-local validation shares excluded), from the same
initial model w^(0) and with the same local SGD settings (``local-epochs`` passes over the
pooled set at ``local-lr``, ``batch-size``, momentum, weight decay, ``precision``). Every
client then receives it and goes through the same personalization round and evaluation as
for any other method, so ``summary.json`` reports it both without personalization
(``acc-before``: the central model itself on the official test split) and with it
(``acc-after``).

The server rebuilds the clients' partitions from the run config (dataset, alpha, seed,
num-clients), which is only possible in simulation. In a deployment the server has no client
data: the method refuses to run when the data cannot be the clients' (``dataset='custom'``
without a server-side ``data-path``, or a client's reported training-set size differing from
the rebuilt partition's).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fedbicross_flwr.data.datasets import DatasetArrays, load_dataset
from fedbicross_flwr.data.partition import make_client_splits
from fedbicross_flwr.data.site import to_tensors
from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput
from fedbicross_flwr.model import initial_state
from fedbicross_flwr.training import SGDSettings, accuracy, client_seed, train_local

DEPLOYMENT_HINT = ("`central` is a simulation-only reference: the server rebuilds the clients' "
                   "partitions from the run config, which is impossible in a deployment, where "
                   "the server holds no client data")


def pooled_indices(ds: DatasetArrays, cfg: SharedConfig, partition_ids: list[int],
                   num_examples: dict[int, int] | None = None) -> np.ndarray:
    """Indices into the official train split: the union of the clients' training splits.

    Raises
    ------
    RuntimeError
        A client's reported training-set size differs from its rebuilt partition (the
        clients' data are not the simulated partition: a deployment).
    """
    splits = make_client_splits(ds.train.labels, ds.test.labels, ds.num_classes,
                                cfg.num_clients, cfg.alpha, cfg.seed, cfg.val_fraction,
                                cfg.min_partition_size)
    for pid in partition_ids:
        if num_examples is not None and len(splits[pid].train_idx) != num_examples[pid]:
            raise RuntimeError(f"{DEPLOYMENT_HINT}: partition {pid} reported "
                               f"{num_examples[pid]} training samples, the rebuilt partition "
                               f"has {len(splits[pid].train_idx)}")
    return np.concatenate([splits[pid].train_idx for pid in sorted(partition_ids)])


def central(inp: MethodInput) -> MethodOutput:
    """Train one model on the pooled training data; every client receives it."""
    cfg = inp.cfg
    if cfg.dataset == "custom" and not cfg.data_path:
        raise RuntimeError(f"{DEPLOYMENT_HINT} (dataset='custom' without data-path)")
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                      cfg.in_channels, cfg.num_classes)
    pids = [u.partition_id for u in inp.uploads]
    idx = pooled_indices(ds, cfg, pids, {u.partition_id: u.num_examples for u in inp.uploads})
    x, y = to_tensors(ds.train.images[idx], ds.train.labels[idx])
    model = inp.new_model()
    model.load_state_dict(initial_state(cfg, inp.in_channels, inp.num_classes))
    opt = SGDSettings(cfg.local_epochs, cfg.local_lr, cfg.local_momentum,
                      cfg.local_weight_decay, cfg.batch_size,
                      seed=client_seed(cfg, cfg.num_clients))  # a seed no client uses
    log(logging.INFO, "central: training on the pooled %d samples of partitions %s "
        "(%d epochs)", len(y), pids, cfg.local_epochs)
    start = time.perf_counter()
    history = train_local(model, x, y, opt, inp.device, cfg.precision, desc="[central]",
                          progress=cfg.progress)
    seconds = time.perf_counter() - start
    x_val, y_val = to_tensors(ds.val.images, ds.val.labels)
    val_acc = (accuracy(model, x_val, y_val, inp.device, cfg.eval_precision) if len(y_val)
               else float("nan"))
    log(logging.INFO, "central: %.1f s, final loss %.4f, official-val accuracy %.4f", seconds,
        history[-1] if history else float("nan"), val_acc)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return MethodOutput(models={pid: state for pid in pids}, clusters={pid: 0 for pid in pids},
                        diagnostics={"pooled-samples": int(len(y)), "train-seconds": seconds,
                                     "official-val-acc": val_acc,
                                     "final-train-loss": history[-1] if history else None})
