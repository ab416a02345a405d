"""The one-shot strategy: one Flower round, train and upload once, then personalize.

:class:`OneShotStrategy` is a :class:`flwr.serverapp.strategy.Strategy`, used as Flower's own
strategies are::

    result = FedBiCross(num_clusters=3).start(grid=grid, initial_arrays=arrays)

A one-shot method is exactly one round of Flower's ``start`` loop:

* ``configure_train`` sends w^(0) (``initial_arrays``) to every connected node, as the
  ``train`` message the project's ClientApp answers (``client_app.app.train``): each node
  trains its local model f_i once and uploads it;
* ``aggregate_train`` reads and checks the uploads (:mod:`fedbicross_flwr.transports.replies`)
  and runs the server method on the usable ones (:meth:`OneShotStrategy.aggregate_uploads`,
  which is also phase 2 of the project's own run, ``fedbicross_flwr.server.run_server``, in
  every engine); it returns the global model when every client receives the same one, else None (a
  personalized method: FedBiCross, cluster-FedAvg), and the uploads' mean local metrics;
* ``configure_evaluate`` sends each node the model chosen for ITS partition as a
  ``train.personalize`` message (``client_app.app.personalize``): the node distils it with
  its own f_i (Eq. 9) and reports its accuracies before and after, never a model;
* ``aggregate_evaluate`` checks those metrics and returns their mean over the clients.

The personalization is Flower's evaluate step, not a second train round, because of what it
returns: a train round in Flower returns a model to aggregate, an evaluate round the clients'
metrics on the model the server sent. Personalization returns only metrics (the personalized
model stays at the site), and those metrics are the evaluation of the method: the accuracy of
the received model (``acc-before``) and of the personalized one (``acc-after``, the paper's
metric), so ``Result.evaluate_metrics_clientapp[1]`` holds them where a FedAvg user looks for
its clients' evaluation. The message is a ``train.personalize`` message because the client
trains (Eq. 9 is a few epochs of SGD) and the ClientApp's train handler does it.

``evaluate_fn`` (server-side evaluation) is called as in Flower's strategies, with round 0 on
``initial_arrays`` and round 1 after the server method: on the global model, or, for a
personalized method, on each distinct model sent, its metrics averaged over the clients that
received it (each client counts once; per partition in :attr:`OneShotStrategy.server_metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.keys.fields import Section, is_key
from fedbicross_flwr.keys.sections import (
    ExecutionConfig,
    FederationConfig,
    TaskConfig,
    parse_site_nodes,
)
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods.base import MethodInput, MethodOutput, run_method
from fedbicross_flwr.model import build_resnet18, probe_for, resnet18_shape, with_counters
from fedbicross_flwr.protocol import ClientFailure, ClientUpload, StateDict
from fedbicross_flwr.reports.headline import OUTLIER_RULE, PHASE3_COLUMNS, median, outlier_sites
from fedbicross_flwr.storage.checkpoint_io import discard_checkpoints
from fedbicross_flwr.training import resolve_device
from fedbicross_flwr.transports.replies import (
    Binding,
    accept_uploads,
    read_personalized,
    read_uploads,
    refuse_bad_metrics,
)

PERSONALIZE = "train.personalize"  # the ClientApp's @app.train("personalize")
# Local metrics of the uploads averaged in round 1's MetricRecord, and the personalization
# metrics averaged in its evaluate MetricRecord (means over clients, each client once).
TRAIN_METRICS = ("train-loss", "val-acc", "test-acc", "test-acc-personal")
EVALUATE_METRICS = ("acc-before", "acc-after", "acc-personal-before", "acc-personal-after",
                    "val-acc-before", "val-acc-after")
# The keys the strategy takes as its own arguments (not method settings).
SHARED = ("seed", "device", "precision", "progress")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class OneShotStrategy(Strategy):
    """A one-shot server method as a Flower strategy (see the module docstring).

    A subclass names its server method (:meth:`server_method`, the catalog function) and the
    settings classes whose keys it takes (:attr:`sections`). Its constructor takes the method's
    settings as keyword arguments named like the run-config keys in snake case
    (``synth_steps`` is ``synth-steps``), with those classes' defaults; each value is checked
    against its key's range when the strategy is built.

    Parameters
    ----------
    seed : int (default: 0)
        Master seed of the server method (noise, clustering, synthesis, student init).
    device : str (default: "auto")
        Where the server method runs: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    precision : str (default: "fp32")
        ``fp32``, ``bf16`` (autocast for synthesis and KD forwards) or ``auto``.
    progress : bool (default: True)
        Log the server method's progress (periodic lines with ETA).
    min_available_nodes : int (default: 2)
        Nodes to wait for before round 1 is sent.
    min_train_nodes : int (default: 2)
        Fewest usable uploads the server method runs on; fewer raise a RuntimeError naming
        every failure.
    site_nodes : mapping of int to int, optional
        Partition-id -> node id (deployment): only that node is sent the partition's
        instructions and only its replies count for it.
    assign_partitions : bool (default: True)
        Without ``site_nodes``: send partition i of the run's dataset to the i-th connected
        node (simulation, as the project's ServerApp does). False: each site names its own
        partition in its reply (a deployment whose sites hold their own data).
    max_num_examples : int or mapping of int to int, optional
        The most training examples a client may report (its FedAvg weight), for all or per
        partition; None: no bound.
    output_dir : str or Path, optional
        Folder for the server method's artefacts (``clusters.csv``, ``weights.csv``,
        ``synthetic.png``, ``<method>.json``, ...). None: a temporary folder, deleted after
        the server method.
    **settings
        Any other key of the method's settings (:meth:`setting_names`).

    Attributes
    ----------
    run_config : RunConfig
        The validated settings, as the server method reads them.
    uploads : list[ClientUpload]
        Round 1's usable uploads, sorted by partition.
    output : MethodOutput or None
        The server method's result: one model per partition, the clusters, its diagnostics.
    local_metrics, client_metrics : dict[int, dict[str, float]]
        Per partition: the upload's metrics; the personalization's metrics.
    server_metrics : dict[int, MetricRecord]
        Per partition: ``evaluate_fn`` on the model it received.
    failures : list[ClientFailure]
        Every client left out, with its phase and reason.
    """

    method_name: ClassVar[str]  # the catalog name (fedbicross_flwr.methods.catalog)
    sections: ClassVar[tuple[type[Section], ...]] = ()  # whose keys the method reads
    extra_keys: ClassVar[tuple[str, ...]] = ()  # single keys of other sections it reads

    def __init__(self, *, seed: int = TaskConfig.seed, device: str = ExecutionConfig.device,
                 precision: str = ExecutionConfig.precision,
                 progress: bool = ExecutionConfig.progress, min_available_nodes: int = 2,
                 min_train_nodes: int = 2, site_nodes: Mapping[int, int] | None = None,
                 assign_partitions: bool = True,
                 max_num_examples: int | Mapping[int, int] | None = None,
                 output_dir: str | Path | None = None, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(self.setting_names()))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected settings {unknown}; it "
                            f"takes {sorted(self.setting_names())}")
        clusters = int(settings.get("num_clusters", 1))
        self.run_config = RunConfig(
            method=self.method_name, seed=seed, device=device, precision=precision,
            progress=progress, **settings,
            num_clients=max(FederationConfig.num_clients, clusters))  # checks every value
        self.min_available_nodes = min_available_nodes
        self.min_train_nodes = min_train_nodes
        self.site_nodes = dict(site_nodes) if site_nodes else None
        self.assign_partitions = assign_partitions
        self.max_num_examples = max_num_examples
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._reset()

    # --- settings ---------------------------------------------------------------------------
    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The method-setting arguments this strategy takes (snake-case run-config keys)."""
        run_config_fields = {f.name for f in dataclasses.fields(RunConfig)}
        names = [f.name for section in cls.sections for f in dataclasses.fields(section)
                 if is_key(f) and f.name in run_config_fields]
        return tuple(dict.fromkeys(n for n in [*names, *cls.extra_keys] if n not in SHARED))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | RunConfig,
                        **overrides: Any) -> Self:
        """The strategy of a project run config (kebab-case keys, as ``context.run_config``,
        or a :class:`RunConfig`): ``overrides`` as keywords.

        Its :attr:`run_config` is that run config, for this strategy's method, so the server
        method reads every key of it as the project's own run does; the federation keys
        (``num-clients``, ``min-clients``, ``site-nodes``, ``max-num-examples``) become the
        node arguments. The project's run (``fedbicross_flwr.server.run_server``) builds its
        one-shot method's strategy this way.
        """
        cfg = (run_config if isinstance(run_config, RunConfig)
               else RunConfig.from_run_config(run_config))
        own = (*SHARED, *cls.setting_names())
        values: dict[str, Any] = {name: getattr(cfg, name) for name in own}
        values.update(min_available_nodes=cfg.num_clients,
                      min_train_nodes=cfg.effective_min_clients,
                      site_nodes=parse_site_nodes(cfg.site_nodes) or None,
                      assign_partitions=not cfg.sites_bring_data,
                      max_num_examples=cfg.max_num_examples or None)
        strategy = cls(**{**values, **overrides})  # checks the overrides
        settings = {k: v for k, v in overrides.items() if k in own}
        strategy.run_config = cfg.for_method(cls.method_name, cfg.run_name).replace(**settings)
        return strategy

    def summary(self) -> None:
        """Log the strategy's configuration (Flower calls it at ``start``)."""
        log(logging.INFO, "\t├──> Server method: %s (one round: train, then personalize)",
            self.method_name)
        log(logging.INFO, "\t├──> Nodes: wait for %d, need %d usable uploads%s",
            self.min_available_nodes, self.min_train_nodes,
            ", bound by site_nodes" if self.site_nodes else "")
        names = (*SHARED, *self.setting_names())
        for i, name in enumerate(names):
            log(logging.INFO, "\t%s── %s = %r", "└" if i == len(names) - 1 else "├",
                name.replace("_", "-"), getattr(self.run_config, name))

    @abstractmethod
    def server_method(self, inp: MethodInput) -> MethodOutput:
        """The server method on the usable uploads: one model per partition."""

    # --- round 1: local training and the server method -------------------------------------
    def _reset(self) -> None:
        self.reference: StateDict | None = None
        self.binding = Binding()
        self._sent: list[Message] = []
        self.uploads: list[ClientUpload] = []
        self.output: MethodOutput | None = None
        self.local_metrics: dict[int, dict[str, Any]] = {}
        self.client_metrics: dict[int, dict[str, Any]] = {}
        self.server_metrics: dict[int, MetricRecord] = {}
        self.failures: list[ClientFailure] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Round 1: w^(0) and the ``train`` instruction to every node (one upload each).

        ``arrays`` is completed with BatchNorm's step counters when it lacks them, so the
        clients upload whole state dicts. ``config`` is passed on, with the partition the
        node is to train when the server binds partitions.
        """
        if server_round != 1:
            return []
        self._reset()
        self.reference = full_state(arrays.to_torch_state_dict())
        nodes = self._wait_for_nodes(grid)
        self.binding, instructed = Binding.of(nodes, self.site_nodes, self.assign_partitions)
        pid_of = self.binding.partition_of()
        record = ArrayRecord(self.reference)
        self._sent = [Message(RecordDict({"arrays": record, "config": ConfigRecord(
            {**dict(config.items()), "phase": "train",
             **self.binding.instruction(pid_of.get(nid))})}),
            dst_node_id=nid, message_type=MessageType.TRAIN) for nid in instructed]
        log(logging.INFO, "configure_train: %s sends w^(0) to %d nodes (of %d connected)",
            type(self).__name__, len(self._sent), len(nodes))
        return self._sent

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            log(logging.INFO, "waiting for nodes to connect: %d connected (minimum %d)",
                len(nodes), self.min_available_nodes)
            time.sleep(1.0)
        return nodes

    def _destinations(self) -> dict[str, int]:
        """Message id -> destination node, of the last instructions (ids set when sent)."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Round 1: check the uploads, run the server method; the global model (None when the
        clients receive different models) and the uploads' mean local metrics.

        Raises
        ------
        RuntimeError
            Fewer usable uploads than ``min_train_nodes`` (every failure named).
        """
        if server_round != 1 or self.reference is None:
            return None, None
        phase = read_uploads(replies, self._destinations(), self.binding)
        uploads, self.local_metrics, refused = accept_uploads(
            phase, self.reference, probe_for(self.reference), self._max_examples)
        self.failures = phase.failures + refused
        _log_failures(self.failures)
        if len(uploads) < self.min_train_nodes:
            raise RuntimeError(f"{type(self).__name__}: only {len(uploads)} usable uploads, "
                               f"min_train_nodes is {self.min_train_nodes}; failures: "
                               f"{[(f.partition_id, f.reason) for f in self.failures]}")
        self.uploads = uploads
        with self._artefacts_dir() as run_dir:
            self.output = self.aggregate_uploads(self._method_input(uploads, run_dir),
                                                 probe_for(self.reference))
            discard_checkpoints(run_dir / "checkpoints")  # nothing to resume
        metrics: dict[str, float] = {"num-uploads": len(uploads),
                                     "num-failures": len(self.failures)}
        metrics.update(client_means(self.local_metrics.values(), TRAIN_METRICS))
        return self._global_arrays(), MetricRecord(metrics)  # type: ignore[arg-type]

    def _max_examples(self, pid: int) -> int | None:
        if isinstance(self.max_num_examples, Mapping):
            return self.max_num_examples.get(pid)
        return self.max_num_examples

    def _method_input(self, uploads: list[ClientUpload], run_dir: Path) -> MethodInput:
        """What the server method gets in round 1: the uploads, :attr:`run_config` with the
        model's shape (read from w^(0)), the device, the artefacts folder.
        """
        assert self.reference is not None
        in_channels, num_classes, width = resnet18_shape(self.reference)
        cfg = self.run_config.replace(
            dataset="custom", in_channels=in_channels, num_classes=num_classes,
            model_width=width, num_clients=max(len(uploads), self.run_config.num_clients))
        device = resolve_device(cfg.device)
        log(logging.INFO, "aggregate_train: server method %r on %d uploads (device %s)",
            self.method_name, len(uploads), device)
        return MethodInput(uploads, cfg, in_channels, num_classes, device, run_dir)

    def aggregate_uploads(self, inp: MethodInput,
                          probe: Callable[[StateDict], str | None]) -> MethodOutput:
        """The server method on checked uploads: one model per partition, each checked
        before it is sent (:func:`~fedbicross_flwr.methods.base.run_method`; ``probe``: the
        forward pass on the fixed probe batch, :func:`~fedbicross_flwr.model.probe_for`).

        The one path from the uploads to the models the clients personalize: round 1's
        ``aggregate_train`` calls it on the uploads it read, and the project's run
        (``fedbicross_flwr.server.run_server``, every engine) on phase 1's uploads.
        """
        return run_method(self.method_name, self.server_method, inp, probe)

    @contextmanager
    def _artefacts_dir(self) -> Iterator[Path]:
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            yield self.output_dir
            return
        with tempfile.TemporaryDirectory(prefix=f"{self.method_name}-") as tmp:
            yield Path(tmp)

    def _global_arrays(self) -> ArrayRecord | None:
        """The model every client receives, or None when they receive different ones."""
        groups = distinct_models(self.models)
        return ArrayRecord(groups[0][1]) if len(groups) == 1 else None

    @property
    def models(self) -> dict[int, StateDict]:
        """Partition -> the model the server method chose for it (empty before round 1)."""
        return dict(self.output.models) if self.output is not None else {}

    @property
    def clusters(self) -> dict[int, int]:
        """Partition -> its cluster (a clustering method; 0 for all otherwise)."""
        return dict(self.output.clusters) if self.output is not None else {}

    # --- the personalization round (Flower's evaluate step of round 1) ---------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Each node its own partition's model, as a ``train.personalize`` message (Eq. 9 at
        the site; only metrics come back). ``arrays`` is not used: the models are the
        server method's, per partition.
        """
        if server_round != 1 or self.output is None:
            return []
        self._sent = [Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(
            {**dict(config.items()), **self.binding.instruction(pid)})}),
            dst_node_id=self.binding.node_of[pid], message_type=PERSONALIZE)
            for pid, state in sorted(self.output.models.items())]
        log(logging.INFO, "configure_evaluate: each of %d nodes gets its partition's model "
            "to personalize", len(self._sent))
        return self._sent

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' accuracies before and after personalization, averaged over the
        clients (each once; per partition in :attr:`client_metrics`), with ``num-clients``;
        None when no client completed.
        """
        if server_round != 1 or self.output is None:
            return None
        phase = read_personalized(replies, self._destinations(), self.binding)
        phase.failures.extend(refuse_bad_metrics(
            phase, self.local_metrics,
            {pid: str(nid) for pid, nid in self.binding.node_of.items()}))
        self.client_metrics = dict(phase.replies)
        self.failures.extend(phase.failures)
        _log_failures(phase.failures)
        if not self.client_metrics:
            return None
        metrics: dict[str, float] = {"num-clients": len(self.client_metrics)}
        metrics.update(client_means(self.client_metrics.values(), EVALUATE_METRICS))
        metrics.update(self_reported_spread(self.client_metrics))
        if far := outlier_sites(_per_site(self.client_metrics, "acc-after")):
            log(logging.WARNING, "aggregate_evaluate: self-reported acc-after of partitions %s "
                "is far from the others' (%s)", far, OUTLIER_RULE)
        return MetricRecord(metrics)  # type: ignore[arg-type]

    # --- Flower's loop, one round --------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 1,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None) -> Result:
        """Run the one-shot protocol: Flower's ``Strategy.start`` for its one round.

        Parameters are Flower's. ``num_rounds`` must be 1 (a one-shot method is one round:
        the upload, then the personalization). ``evaluate_fn`` is called with round 0 on
        ``initial_arrays`` and round 1 on the model each client receives (see the module
        docstring).

        Returns
        -------
        Result
            ``arrays``: the global model (empty for a personalized method: see
            :attr:`models`); ``train_metrics_clientapp[1]``: the uploads' mean local
            metrics; ``evaluate_metrics_clientapp[1]``: the mean accuracies before and after
            personalization, as the sites report them, with each one's median and the number
            of sites far from the others (:func:`self_reported_spread`);
            ``evaluate_metrics_serverapp``: ``evaluate_fn``'s.
        """
        if num_rounds != 1:
            raise ValueError(f"{type(self).__name__} is one-shot: one round (the upload, then "
                             f"the personalization), so num_rounds must be 1, got {num_rounds}")

        def evaluate_received(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            assert evaluate_fn is not None
            return self._evaluate_received(evaluate_fn, server_round, arrays)

        return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                             evaluate_config, evaluate_received if evaluate_fn else None)

    def _evaluate_received(self, evaluate_fn: EvaluateFn, server_round: int,
                           arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` on ``arrays`` (round 0), or on every distinct model sent, averaged
        over the clients that received it.
        """
        if server_round != 1 or self.output is None:
            return evaluate_fn(server_round, arrays)
        groups = distinct_models(self.models)
        self.server_metrics = {}
        for pids, state in groups:
            record = evaluate_fn(server_round, ArrayRecord(state))
            if record is not None:
                self.server_metrics.update(dict.fromkeys(pids, record))
        if len(groups) == 1 or not self.server_metrics:
            return next(iter(self.server_metrics.values()), None)
        names = {k for r in self.server_metrics.values() for k, v in r.items()
                 if isinstance(v, (int, float))}
        return MetricRecord(client_means(  # type: ignore[arg-type]
            [dict(r.items()) for r in self.server_metrics.values()], sorted(names)))


def full_state(state: StateDict) -> StateDict:
    """A ResNet-18 state dict with BatchNorm's step counters (filled in when missing)."""
    fresh = build_resnet18(*resnet18_shape(state)).state_dict()
    return with_counters(state, fresh)


def distinct_models(models: Mapping[int, StateDict]) -> list[tuple[list[int], StateDict]]:
    """The distinct models of ``models`` (partition -> state), each with its partitions."""
    groups: list[tuple[list[int], StateDict]] = []
    for pid, state in sorted(models.items()):
        for pids, other in groups:
            if other is state or (other.keys() == state.keys()
                                  and all(torch.equal(other[k], state[k]) for k in state)):
                pids.append(pid)
                break
        else:
            groups.append(([pid], state))
    return groups


def client_means(rows: Iterable[Mapping[str, Any]], names: Iterable[str]) -> dict[str, float]:
    """Per name, the mean over ``rows`` of its finite values (NaN when there is none)."""
    rows = list(rows)
    out = {}
    for name in names:
        values = [float(r[name]) for r in rows if name in r and math.isfinite(float(r[name]))]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


def _log_failures(failures: Iterable[ClientFailure]) -> None:
    for f in failures:
        log(logging.WARNING, "partition %s (node %s) left out in %s: %s", f.partition_id,
            f.node, f.phase, f.reason)


def _per_site(client_metrics: Mapping[int, Mapping[str, Any]], key: str) -> dict[int, float]:
    """Partition -> its finite figure ``key``."""
    return {pid: float(m[key]) for pid, m in client_metrics.items()
            if isinstance(m.get(key), (int, float)) and math.isfinite(float(m[key]))}


def self_reported_spread(client_metrics: Mapping[int, Mapping[str, Any]]) -> dict[str, float]:
    """The personalization round's figures are the sites' own (a user's ServerApp holds no
    site's test data): beside each mean, its ``<key>-median``, and ``acc-after-outliers``, the
    number of sites whose ``acc-after`` is far from the others'
    (:func:`~fedbicross_flwr.reports.headline.outlier_sites`; partitions logged).
    """
    out: dict[str, float] = {}
    for key in PHASE3_COLUMNS:
        if (mid := median(_per_site(client_metrics, key).values())) is not None:
            out[f"{key}-median"] = mid
    out["acc-after-outliers"] = len(outlier_sites(_per_site(client_metrics, "acc-after")))
    return out


__all__ = ["EVALUATE_METRICS", "OneShotStrategy", "TRAIN_METRICS", "client_means",
           "distinct_models", "full_state", "self_reported_spread"]
