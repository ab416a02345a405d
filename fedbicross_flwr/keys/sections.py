"""The run-config keys every method shares: what to run, the federation, the clients' local
training, the personalization (Stage 3) and the execution, and :class:`SharedConfig`, all five
with the checks across them.

Each group is a small frozen :class:`~fedbicross_flwr.keys.fields.Section`; a key's name is
its field's name in kebab case. The keys that belong to one method live next to that method
(:mod:`fedbicross_flwr.distill.config`, :mod:`fedbicross_flwr.fedbicross.config`,
:mod:`fedbicross_flwr.methods.baselines.config`,
:mod:`fedbicross_flwr.methods.flower_strategies`). What the clients, the data, the transports
and the storage read of a run is a :class:`SharedConfig`; the run configuration
(:class:`fedbicross_flwr.config.run_config.RunConfig`, above the methods) is a SharedConfig
with every method's section added. This module imports nothing of the package above it and
no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.keys.fields import Section, key, key_name


@dataclass(frozen=True)
class TaskConfig(Section):
    """What to run: the method(s), the dataset, the model and the master seed."""

    method: str = key("fedavg1", "Server method: a name of the methods catalog (README, "
                      "Methods), checked by the run config.")
    methods: str = key("",
                       "Comma-separated server methods run in ONE run on the same client "
                       "uploads (phase 1 once; then per method: server method and "
                       "personalization), one run folder each plus, for 2+ methods, "
                       "<run-name>-comparison (table and summary picture). Empty: only `method`. Any number "
                       "of multi-round methods (fedavg-r, fedadam-r, ...) may be listed: each "
                       "retrains the clients from the same initial model, after the one-shot "
                       "methods.")
    dataset: str = key("retinamnist",
                       "MedMNIST 2D flag (e.g. bloodmnist), `bloodmnist-pbc` (BloodMNIST "
                       "rebuilt from its source images, read from data-dir), `digits` "
                       "(scikit-learn, built on the fly) or `custom` (an npz archive at "
                       "data-path).")
    data_dir: str = key("",
                        "Folder with official MedMNIST archives (<flag>.npz). Empty: "
                        "$FEDBICROSS_DATA_DIR, else the archive embedded in the package.")
    data_path: str = key("",
                         "An npz archive in MedMNIST format (dataset=custom). In deployment "
                         "each site sets it in its node config instead.")
    allow_download: bool = key(False,
                               "Let the medmnist package download a missing official archive.")
    in_channels: int = key(0,
                           "Image channels; 0 = from the dataset's metadata (needed for "
                           "custom).", low=0, high=3)
    num_classes: int = key(0,
                           "Number of classes; 0 = from the dataset's metadata (needed for "
                           "custom).", low=0, high=1000)
    # Base channel count w of the CIFAR-style ResNet-18 every client and server model uses:
    # stages of w, 2w, 4w, 8w channels (paper: 64). Forward FLOPs grow about with w^2.
    model_width: int = key(64,
                           "Base channel count w of ResNet-18 (stages w, 2w, 4w, 8w; paper: "
                           "64). Forward FLOPs grow about with w^2: 16 costs about 1/16 of 64.",
                           low=4, high=128)
    # In FedBiCross: the master seed of the noise images, K-means, labels, jitter, the I^val
    # split and the cluster-model initialisation.
    seed: int = key(0, "Seed of the partition, the models and every sampler.", low=0,
                    high=10**9)  # numpy's legacy generator (Flower's DP noise) takes < 2^32


@dataclass(frozen=True)
class FederationConfig(Section):
    """The federation: how many clients, how long to wait, how the data is partitioned."""

    num_clients: int = key(5,
                           "Nodes the server waits for before phase 1.", low=1, high=10000)
    min_clients: int = key(0,
                           "Fewest answering clients to go on with (0 = all of num-clients).",
                           low=0, high=10000)
    node_wait_timeout: float = key(120.0,
                                   "Seconds to wait for num-clients nodes to connect.", low=0.0)
    round_timeout: float = key(0.0,
                               "Seconds to wait for the replies of one phase (0 = no limit).",
                               low=0.0)
    site_nodes: str = key("",
                          "Deployment: the node id of each site, as `partition-id=node-id` "
                          "pairs separated by commas (node ids from `flwr supernode "
                          "register`). Only that node is sent the site's instructions and "
                          "only its replies count for the partition. Empty: in simulation the "
                          "server assigns the partitions to the connected nodes; in deployment "
                          "the sites' own partition-ids are trusted and a partition claimed "
                          "twice is refused.")
    max_num_examples: int = key(0,
                                "Largest num-examples (FedAvg weight) a client may report. 0: "
                                "in simulation the size of the partition the server assigned; "
                                "in deployment no bound.", low=0)
    alpha: float = key(0.1, "Dirichlet concentration of the label skew (lower = more "
                       "non-IID).", low=0.0, low_open=True, high=1e6)
    min_partition_size: int = key(10,
                                  "Smallest training partition the Dirichlet sampler accepts.",
                                  low=1)
    val_fraction: float = key(0.1,
                              "Share of each client's partition held out as local validation.",
                              low=0.0, high=0.5)


@dataclass(frozen=True)
class LocalTrainingConfig(Section):
    """The clients' local training of phase 1 (paper Sec. IV-A)."""

    local_epochs: int = key(100, "Local training epochs (paper: 100).", low=1)
    local_lr: float = key(1e-3, "Local SGD learning rate (paper: 1e-3).",
                          low=0.0, low_open=True, high=10.0)
    local_momentum: float = key(0.9, "Local SGD momentum.", low=0.0, high=0.999)
    local_weight_decay: float = key(5e-4, "Local SGD weight decay.",
                                    low=0.0, high=1.0)
    batch_size: int = key(128, "Client batch size (paper: 128).", low=1)


@dataclass(frozen=True)
class PersonalizationConfig(Section):
    """The clients' personalized distillation of phase 3 (Stage 3, Eq. 9)."""

    pers_epochs: int = key(10,
                           "Personalized distillation epochs (paper: 10; 0 = none, w/o PKD).",
                           low=0)
    pers_lr: float = key(1e-3, "Personalization SGD learning rate.",
                         low=0.0, low_open=True, high=10.0)
    pers_gamma: float = key(0.5, "Eq. 9 weight of KL to the received model.",
                            low=0.0, high=100.0)
    pers_delta: float = key(0.3, "Eq. 9 weight of KL to the client's own model.",
                            low=0.0, high=100.0)


@dataclass(frozen=True)
class ExecutionConfig(Section):
    """Where and how the work runs: device, precision, threads, output and progress."""

    device: str = key("auto", "auto (CUDA when present), cpu or cuda.",
                      choices=("auto", "cpu", "cuda"))
    # 'bf16' runs training, synthesis and KD forward passes under torch.autocast(bfloat16);
    # 'fp32' keeps full precision; 'auto' is bf16 where the device computes bfloat16 natively
    # (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16) and fp32 elsewhere, where bf16 is
    # emulated and slower than fp32 (training.uses_bf16).
    precision: str = key("fp32",
                         "fp32, bf16 autocast for training/synthesis forward passes, or auto "
                         "(bf16 where the device has native bfloat16, else fp32; on an "
                         "AVX2-only CPU bf16 is emulated and about 11x slower, "
                         "docs/BENCHMARKS.md).",
                         choices=("fp32", "bf16", "auto"))
    eval_precision: str = key("fp32",
                              "Precision of the accuracy forwards (evaluation only): fp32, "
                              "bf16 autocast with channels-last (about 2x faster on a CPU with "
                              "native bfloat16; 0-2 of 540 digits test predictions change, "
                              "docs/RESULTS.md) or auto (as for precision).",
                              choices=("fp32", "bf16", "auto"))
    num_threads: int = key(0, "torch CPU threads (0 = torch's default).", low=0)
    # FedBiCross: torch.compile (inductor) the members' forward inside synthesis (Eq. 2),
    # where most of the server time goes. Same numbers up to float rounding; costs a one-off
    # compile.
    compile: bool = key(False,
                        "torch.compile the client models' forward inside FedBiCross synthesis "
                        "(inductor; a one-off compile of about a minute on CPU, seconds from "
                        "its disk cache, one graph per architecture; then about 13% less "
                        "time per synthesis step on CPU at N=5, B=64; docs/BENCHMARKS.md).")
    # What `compile` covers: the synthesis forwards only (measured on CPU, where the other
    # stages gained at most 5 % each), or every per-step loop of the server stage (synthesis,
    # noise adaptation, soft labels, the bi-level step: the GPU path, where kernel launches,
    # not arithmetic, set the pace).
    compile_scope: str = key("synthesis",
                             "With compile = true: torch.compile the synthesis forwards only "
                             "(synthesis) or also the noise-adaptation and soft-label forwards "
                             "and the bi-level student forward (all; one compile per graph, "
                             "for GPUs, docs/BENCHMARKS.md). Ignored when compile is false.",
                             choices=("synthesis", "all"))
    output_dir: str = key("",
                          "Absolute folder for run folders. Empty: $FEDBICROSS_OUTPUT_DIR, "
                          "else <project>/outputs.")
    run_name: str = key("",
                        "Name of the run folder: one folder name inside output-dir, without "
                        "path separators or control characters (empty: "
                        "<time>-<dataset>-<method>).")
    progress: bool = key(True, "Show progress bars / periodic log lines.")
    resume: bool = key(False,
                       "Continue the run folder named run-name from its checkpoints (finished "
                       "server stages are not redone); needs run-name.")
    keep_checkpoints: bool = key(False,
                                 "Keep the run folder's checkpoints/ (uploads, server stages) "
                                 "after a successful run (default: deleted to save disk).")



C = TypeVar("C", bound="SharedConfig")


@dataclass(frozen=True)
class SharedConfig(ExecutionConfig, PersonalizationConfig, LocalTrainingConfig, FederationConfig,
                   TaskConfig):
    """The five shared sections together, checked across keys: what a client, the data, a
    transport and the storage read of a run (a :class:`~fedbicross_flwr.config.run_config.
    RunConfig` is one, with the methods' sections added).
    """

    def __post_init__(self) -> None:
        super().__post_init__()  # each key against its range
        if self.min_clients > self.num_clients:
            raise ConfigError(
                f"min-clients={self.min_clients} exceeds num-clients={self.num_clients}"
            )
        if self.dataset == "custom" and not self.data_path and not (self.in_channels
                                                                  and self.num_classes):
            raise ConfigError("dataset='custom' needs data-path (an npz archive), or "
                              "in-channels and num-classes when every site sets data-path in "
                              "its node config (deployment)")
        try:
            parse_site_nodes(self.site_nodes)
        except ValueError as err:
            raise ConfigError(f"site-nodes: {err}") from err
        if self.output_dir and not Path(self.output_dir).is_absolute():
            raise ConfigError(f"output-dir must be an absolute path, got {self.output_dir!r}")
        if self.run_name and (self.run_name in (".", "..") or "/" in self.run_name
                              or "\\" in self.run_name):
            raise ConfigError(f"run-name must be one folder name inside output-dir (no '/', "
                              f"'\\' or '..'), got {self.run_name!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in self.run_name):
            raise ConfigError(f"run-name must hold no control character (newline, tab, ...), "
                              f"got {self.run_name!r}")
        if self.resume and not self.run_name:
            raise ConfigError("resume=true needs run-name (the run folder to continue)")

    @property
    def effective_min_clients(self) -> int:
        """Fewest answering clients phase 1 accepts."""
        return self.min_clients or self.num_clients

    @property
    def sites_bring_data(self) -> bool:
        """Deployment: every site reads its own archive and the server holds no dataset."""
        return self.dataset == "custom" and not self.data_path

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping (inverse of :meth:`from_mapping`)."""
        return {key_name(f): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self: C, **overrides: Any) -> C:
        """A copy with some fields (snake_case names) changed, validated again."""
        return dataclasses.replace(self, **overrides)

    def summary(self) -> str:
        """One line per key, for the log."""
        return "\n".join(f"  {k} = {v!r}" for k, v in self.to_run_config().items())


def parse_site_nodes(text: str) -> dict[int, int]:
    """``"0=123, 1=456"`` -> ``{0: 123, 1: 456}`` (partition-id -> Flower node id).

    Raises
    ------
    ValueError
        A pair that is not ``int=int``, a negative partition-id, or a partition or node named
        twice.
    """
    out: dict[int, int] = {}
    for pair in (p.strip() for p in text.replace(";", ",").split(",")):
        if not pair:
            continue
        pid_text, sep, node_text = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            pid, node = int(pid_text), int(node_text)
        except ValueError:
            raise ValueError(f"{pair!r} is not partition-id=node-id (two integers)") from None
        if pid < 0:
            raise ValueError(f"partition-id {pid} is negative")
        if pid in out:
            raise ValueError(f"partition-id {pid} is bound twice")
        if node in out.values():
            raise ValueError(f"node {node} is bound to two partitions")
        out[pid] = node
    return out


__all__ = ["ExecutionConfig", "FederationConfig", "LocalTrainingConfig", "PersonalizationConfig",
           "SharedConfig", "TaskConfig", "parse_site_nodes"]
