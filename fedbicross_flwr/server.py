"""The one-shot protocol on the server, independent of how messages travel.

Phase 1 collects every client's single upload, phase 2 runs the configured server method,
phase 3 sends each client its own model for ``train.personalize`` and collects the metrics (in
a simulation with the personalized models, which the server scores itself:
:func:`personalize_and_score`); then the run folder is written. A one-shot method's phase 2 is
its Flower strategy's (:mod:`fedbicross_flwr.strategies`): the strategy object built from the
run config aggregates the uploads (``OneShotStrategy.aggregate_uploads``), the same code its
``aggregate_train`` runs in a user's ServerApp; the uploads are accepted and the replies read
by the same functions too (:mod:`fedbicross_flwr.transports.replies`). A
:class:`Transport` carries the client phases: Flower's Grid in
:mod:`fedbicross_flwr.transports.grid_transport` (simulation or deployment), or plain function
calls in :mod:`fedbicross_flwr.transports.direct` (one process, no Flower runtime).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedbicross_flwr.config.run_config import RunConfig, check_strategy_args
from fedbicross_flwr.data.datasets import DataError, load_dataset
from fedbicross_flwr.data.site import example_bounds
from fedbicross_flwr.logging_utils import log, position_text, run_position
from fedbicross_flwr.methods import collect_uploads, method_names, method_spec
from fedbicross_flwr.methods.base import MethodInput, MethodOutput, ServerMethod, run_method
from fedbicross_flwr.methods.central import central
from fedbicross_flwr.methods.local import local
from fedbicross_flwr.methods.rounds import flower_r, reply_optional_metrics
from fedbicross_flwr.model import initial_state, probe_for

# The protocol types live in fedbicross_flwr.protocol; importing them from here keeps working.
from fedbicross_flwr.protocol import (  # noqa: F401
    ClientFailure,
    ClientReply,
    ClientUpload,
    PhaseResult,
    StateDict,
    metrics_problem,
    num_examples_problem,
    upload_problem,
    validate_upload,
)
from fedbicross_flwr.reports.headline import SCORED_BY_SERVER, SELF_REPORTED, headline
from fedbicross_flwr.reports.knowledge import knowledge_markdown, write_knowledge
from fedbicross_flwr.reports.results import (
    create_run_dir,
    finished_run_dir,
    logging_to,
    percent,
    summarize,
    write_clients_csv,
    write_summary_md,
)
from fedbicross_flwr.reports.scoring import server_scoring
from fedbicross_flwr.storage.atomic import write_json
from fedbicross_flwr.storage.checkpoint_io import discard_checkpoints
from fedbicross_flwr.storage.uploads_checkpoint import checkpointed_uploads
from fedbicross_flwr.strategies import BY_METHOD, strategy_for
from fedbicross_flwr.training import resolve_device
from fedbicross_flwr.transports.communication import add_traffic
from fedbicross_flwr.transports.replies import accept_uploads, refuse_bad_metrics
from fedbicross_flwr.transports.transport import Transport


def dataset_shape(cfg: RunConfig) -> tuple[int, int, float | None]:
    """(in_channels, num_classes, majority-class rate of the official test split or None)."""
    if cfg.dataset == "custom" and not cfg.data_path and cfg.in_channels and cfg.num_classes:
        # A deployment: every site reads its own archive (node config data-path); the server
        # holds no data, so there is no shared test split and no majority-class rate.
        log(logging.INFO, "dataset='custom' without a server-side data-path: the sites read "
            "their own archives; using in-channels=%d, num-classes=%d from the run config",
            cfg.in_channels, cfg.num_classes)
        return cfg.in_channels, cfg.num_classes, None
    try:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                          cfg.in_channels, cfg.num_classes)
        return ds.in_channels, ds.num_classes, ds.majority_rate("test")
    except DataError as err:
        if cfg.in_channels and cfg.num_classes:
            log(logging.WARNING, "server cannot read the dataset (%s); using in-channels=%d, "
                "num-classes=%d from the run config", err, cfg.in_channels, cfg.num_classes)
            return cfg.in_channels, cfg.num_classes, None
        raise


def run_server(cfg: RunConfig, transport: Transport, rerun_name: str | None = None) -> Path:
    """Run the three phases and write the run folder; returns its path.

    ``rerun_name`` is the ``run-name`` a user reruns with to resume (default: the folder's).
    """
    run_dir = create_run_dir(cfg)
    entry = (run_dir, rerun_name or run_dir.name)
    _ACTIVE_RUNS.append(entry)
    with logging_to(run_dir / "log.txt"):  # the stop's own lines go to log.txt too
        try:
            return _run(cfg, transport, run_dir)
        except (SystemExit, KeyboardInterrupt):  # SIGTERM/SIGINT: `flwr stop`, a SuperLink gone
            log_stopped_runs()
            raise
        finally:
            if entry in _ACTIVE_RUNS:
                _ACTIVE_RUNS.remove(entry)


# Run folders being written (folder, run-name to resume with), for a stop from outside.
_ACTIVE_RUNS: list[tuple[Path, str]] = []


def log_stopped_runs() -> None:
    """Log :func:`stopped_line` for every run being written, once.

    The ServerApp registers this as a Flower exit handler: on SIGTERM (``flwr stop``, the
    SuperLink going down) Flower runs its exit handlers and then ends the process, possibly
    with ``os._exit`` before any ``except`` or ``finally`` of the run is reached.
    """
    while _ACTIVE_RUNS:
        log(logging.ERROR, "%s", stopped_line(*_ACTIVE_RUNS.pop()))


def stopped_line(run_dir: Path, run_name: str) -> str:
    """What a run stopped from outside (a signal) leaves, and how to go on from it."""
    if (run_dir / "checkpoints").is_dir():
        kept = (f"the stages it finished are kept in {run_dir / 'checkpoints'}: rerun the same "
                f"command with run-name='{run_name}' resume=true to go on from them "
                "(phase 1 runs again; the server stage loads its checkpoints)")
    else:
        kept = "nothing was checkpointed yet (phase 1 had not finished): rerun the same command"
    return (f"the run was stopped before it finished (a signal: `flwr stop`, the SuperLink "
            f"going down, Ctrl-C); {kept}")


def run_methods(cfg: RunConfig, transport: Transport) -> dict[str, Path]:
    """Every method of ``cfg.method_list`` on the SAME client uploads, then the comparison.

    Phase 1 runs once (the transport hands the same replies to every later method); each
    method then runs phase 2 and phase 3 in its own run folder ``<run-name>-<method>``. The
    multi-round methods (any number of them) run after the others (:func:`run_order`): each
    replaces phase 1 by its R rounds from the same initial model w^(0), on the same
    partition, and its clients personalize with their last round's local model. The
    folder ``<run-name>-comparison`` gets the comparison table (``comparison.csv``,
    ``comparison.md``, the methods in the order listed) and the summary picture
    (``summary.png``); the table is also logged. One method alone gets no comparison.
    Every multi-round method's ``strategy-args`` are checked before anything is sent.

    Returns
    -------
    dict[str, Path]
        Method -> run folder, and ``"comparison"`` -> the comparison folder (2+ methods).
    """
    from fedbicross_flwr.reports.comparison import write_comparison

    methods = cfg.method_list
    check_strategy_args(cfg)
    base = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.dataset}"
    run_dirs: dict[str, Path] = {}
    if (order := run_order(methods)) != methods:
        log(logging.INFO, "methods run in the order %s: the one-shot methods share phase 1, "
            "then each multi-round method retrains the clients from w^(0)", ",".join(order))
    for j, method in enumerate(order, start=1):
        one = cfg.for_method(method, f"{base}-{method}")
        if (done := finished_run_dir(one)) is not None:  # resume=true after a stop
            log(logging.INFO, "resume: method %s already finished in %s; its results are kept",
                method, done)
            run_dirs[method] = done
            continue
        with run_position(f"method {j}/{len(methods)} {method}"):
            log(logging.INFO, "method %d of %d: %s", j, len(methods), method)
            run_dirs[method] = run_server(one, transport, base)
    if len(methods) == 1:
        return run_dirs
    out = create_run_dir(cfg.replace(methods="", strategy_args="", run_name=f"{base}-comparison"))
    table = write_comparison(out, {m: run_dirs[m] for m in methods})
    log(logging.INFO, "comparison of %d methods on the same client uploads (%s):\n%s",
        len(methods), out, table)
    return {**run_dirs, "comparison": out}


def run_order(methods: list[str]) -> list[str]:
    """The order :func:`run_methods` runs ``methods`` in: the methods that use phase 1's uploads
    (one-shot, references) as listed, then the multi-round methods as listed.

    A multi-round method retrains the clients, and a client keeps its last local model as its
    own model f_i for the personalization; the one-shot methods before it personalize with
    phase 1's f_i, each multi-round method with the f_i of its own last round.
    """
    rounds = set(method_names(kind="multi-round"))
    return [m for m in methods if m not in rounds] + [m for m in methods if m in rounds]


def _run(cfg: RunConfig, transport: Transport, run_dir: Path) -> Path:
    """The three phases of one method into ``run_dir``; returns it.

    Phase 1 collects one upload per client (each validated against w^(0) and its example
    bound; the rejected ones become failures) and checkpoints them; phase 2 runs the server
    method; phase 3 sends its models back for personalization (:func:`personalize_and_score`:
    who scores the accuracies). ``clients.csv``, ``summary.json``/``.md`` (with the headline:
    :func:`~fedbicross_flwr.reports.headline.headline`) and the knowledge report are then
    written.

    Raises
    ------
    RuntimeError
        Fewer usable uploads than ``min-clients``, or a method that returns no model for a
        client.
    """
    times: dict[str, float] = {}
    write_json(run_dir / "run_config.json", cfg.to_run_config())
    log(logging.INFO, "run folder %s; settings:\n%s", run_dir, cfg.summary())
    in_channels, num_classes, majority = dataset_shape(cfg)
    init = initial_state(cfg, in_channels, num_classes)  # w^(0), also the upload reference

    # Phase 1: one upload per client -------------------------------------------------------
    t0 = time.perf_counter()
    log(logging.INFO, "%sphase 1/3: local training on the clients", position_text())
    phase1 = collect_uploads(cfg, transport, init, run_dir)  # multi-round: R rounds
    times["phase1-local-training"] = time.perf_counter() - t0
    probe = probe_for(init)  # a forward pass on a fixed batch: finite, bounded outputs
    uploads, local_metrics, failures = _accepted_uploads(cfg, phase1, init, probe)
    if len(uploads) < cfg.effective_min_clients:
        write_json(run_dir / "failures.json", [f.__dict__ for f in failures])
        raise RuntimeError(f"only {len(uploads)} usable client models, min-clients is "
                           f"{cfg.effective_min_clients}; see {run_dir / 'failures.json'}")

    sizes = example_bounds(cfg, phase1.num_partitions)
    uploads = checkpointed_uploads(run_dir, uploads, cfg.resume, init, probe,
                                   {pid: cfg.max_num_examples or sizes.get(pid)
                                    for pid in phase1.replies})

    # Phase 2: the server method ---------------------------------------------------------------
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    log(logging.INFO, "%sphase 2/3: server method %r on %d client models (device %s)",
        position_text(), cfg.method, len(uploads), device)
    with run_position(f"phase 2/3 {cfg.method}"):
        inp = MethodInput(uploads, cfg, in_channels, num_classes, device, run_dir,
                          round_model=phase1.global_state)
        out = server_method(cfg, inp, probe)
    times["phase2-server-method"] = time.perf_counter() - t0

    # Phase 3: personalization ----------------------------------------------------------------
    t0 = time.perf_counter()
    log(logging.INFO, "%sphase 3/3: personalized distillation on the clients",
        position_text())
    phase3, scored_by = personalize_and_score(cfg, transport, out.models, phase1,
                                              local_metrics, (init, probe, device))
    times["phase3-personalization"] = time.perf_counter() - t0
    failures.extend(phase3.failures)

    # Results ----------------------------------------------------------------------------------
    rows = _client_rows(phase1, phase3, out.clusters, local_metrics, failures)
    write_clients_csv(run_dir / "clients.csv", rows)
    summary = summarize(rows, cfg, {"majority-rate": majority, **headline(rows, scored_by),
                                    "wall-times-s": times,
                                    "cost": cost_summary(cfg, rows, times, phase1.measured),
                                    "failures": [f.__dict__ for f in failures],
                                    "method-diagnostics": out.diagnostics})
    knowledge = write_knowledge(run_dir, cfg, uploads, out, rows, in_channels, num_classes,
                                device)
    if knowledge is not None:
        summary["knowledge"] = knowledge.get("stages")
    write_summary_md(run_dir / "summary.md", summary, knowledge_markdown(knowledge)
                     if knowledge is not None and "stages" in knowledge else "")
    write_json(run_dir / "summary.json", summary)  # last: the run counts as finished
    if not cfg.keep_checkpoints:  # the run is finished: they could only be used to resume it
        discard_checkpoints(run_dir / "checkpoints")
    log(logging.INFO, "done: paper metric (official test, mean over clients, after "
        "personalization) %s; results in %s", percent(summary["acc-after-mean"], "%"), run_dir)
    return run_dir


# The references' server methods (a one-shot method's is its strategy's, a multi-round one's
# flower_r): every client keeps its own model, or gets the pooled-data model.
REFERENCES: dict[str, ServerMethod] = {"local": local, "central": central}


def server_method(cfg: RunConfig, inp: MethodInput,
                  probe: Callable[[StateDict], str | None]) -> MethodOutput:
    """Phase 2 of ``cfg.method`` (``inp.cfg`` is ``cfg``): every partition's model, checked
    before it is sent.

    A one-shot method runs through its Flower strategy, built from the run config
    (:func:`~fedbicross_flwr.strategies.strategy_for`,
    :meth:`~fedbicross_flwr.strategies.base.OneShotStrategy.aggregate_uploads`); a reference
    (``local``, ``central``: :data:`REFERENCES`) or a multi-round method (w^(R) for every
    client: :func:`~fedbicross_flwr.methods.rounds.flower_r`), which has no one-shot
    strategy, through its function. Both go through
    :func:`~fedbicross_flwr.methods.base.run_method`.
    """
    name = cfg.method
    if name in BY_METHOD:
        return strategy_for(cfg).aggregate_uploads(inp, probe)
    function = flower_r if method_spec(name).multiround else REFERENCES[name]
    return run_method(name, function, inp, probe)


def personalize_and_score(cfg: RunConfig, transport: Transport, models: dict[int, StateDict],
                          phase1: PhaseResult, local_metrics: dict[int, dict],
                          check: tuple[StateDict, Callable[[StateDict], str | None],
                                       torch.device]) -> tuple[PhaseResult, str]:
    """Phase 3, and who scored its accuracies: ``"server"`` or ``"site (self-reported)"``.

    In a simulation (the server assigned the partitions and reads the dataset) the sites send
    their personalized models back and the server scores them and the models it sent
    (:mod:`fedbicross_flwr.reports.scoring`): a site's own figures cannot move the results. In
    a deployment the figures are the sites' own. Either way a reply whose metrics are refused
    (:func:`refuse_bad_metrics`) is left out; the phase's failures (refusals and, scored,
    self-report mismatches) are in the result's ``failures``, each logged.

    ``check`` is (w^(0), the probe forward pass, the server's device).
    """
    reference, probe, device = check
    scoring = server_scoring(cfg, phase1.num_partitions, reference, probe)
    phase3 = transport.personalize(cfg, models, return_models=scoring is not None)
    phase3.failures.extend(refuse_bad_metrics(phase3, local_metrics, phase1.partitions))
    mismatches: list[ClientFailure] = []
    if scoring is not None:
        refused, mismatches = scoring.score(phase3, models, phase1.partitions, device)
        phase3.failures.extend(refused)
    for f in phase3.failures:
        log(logging.WARNING, "client %s (node %s) missing in phase 3: %s", f.partition_id,
            f.node, f.reason)
    for f in mismatches:
        log(logging.WARNING, "client %s (node %s): %s", f.partition_id, f.node, f.reason)
    phase3.failures.extend(mismatches)
    return phase3, SCORED_BY_SERVER if scoring is not None else SELF_REPORTED


def _accepted_uploads(cfg: RunConfig, phase1: PhaseResult, init: StateDict,
                      probe: Callable[[StateDict], str | None]
                      ) -> tuple[list[ClientUpload], dict[int, dict], list[ClientFailure]]:
    """Phase 1's usable uploads, each client's metrics, and the failures (rejected included).

    An upload is rejected when :func:`upload_problem` refuses it: its state against w^(0)
    (:func:`validate_upload`), its ``num-examples`` above ``max-num-examples`` (else the
    partition's size bound), or any metric out of its range (:func:`metrics_problem`).
    """
    sizes = example_bounds(cfg, phase1.num_partitions)
    uploads, local_metrics, refused = accept_uploads(
        phase1, init, probe, lambda pid: cfg.max_num_examples or sizes.get(pid),
        reply_optional_metrics(cfg))
    for f in refused:
        log(logging.WARNING, "partition %d: %s", f.partition_id, f.reason)
    for f in phase1.failures:
        log(logging.WARNING, "client %s (node %s) left out in phase 1: %s", f.partition_id,
            f.node, f.reason)
    return uploads, local_metrics, phase1.failures + refused


def _client_rows(phase1: PhaseResult, phase3: PhaseResult, clusters: dict[int, int],
                 local_metrics: dict[int, dict], failures: list[ClientFailure]) -> list[dict]:
    """One ``clients.csv`` row per partition (every one, failed ones with their state)."""
    traffic_up = add_traffic(dict(phase1.bytes_up), phase3.bytes_up)
    traffic_down = add_traffic(dict(phase1.bytes_down), phase3.bytes_down)
    rows = []
    expected = set(phase1.partitions) | {f.partition_id for f in failures
                                         if f.partition_id is not None}
    for pid in sorted(set(local_metrics) | expected):  # every partition, with its state
        lm, pm = local_metrics.get(pid, {}), phase3.replies.get(pid)
        rows.append({
            "partition-id": pid, "cluster": clusters.get(pid),
            "n-train": lm.get("num-examples"), "n-test": lm.get("n-test"),
            "n-test-personal": lm.get("n-test-personal"), "local-val-acc": lm.get("val-acc"),
            "local-test-acc": lm.get("test-acc"),
            "local-test-acc-personal": lm.get("test-acc-personal"),
            "train-seconds": lm.get("train-seconds"),
            **({k: pm.get(k) for k in ("acc-before", "acc-after", "acc-personal-before",
                                        "acc-personal-after")} if pm else {}),
            "bytes-up": traffic_up.get(pid), "bytes-down": traffic_down.get(pid),
            "status": "ok" if pm else "missing",
        })
    return rows


def cost_summary(cfg: RunConfig, rows: list[dict], times: dict[str, float],
                 measured: bool) -> dict[str, object]:
    """What the run cost: bytes per client each way, model exchanges, compute seconds.

    A model exchange is one round trip of a model: R training rounds for a multi-round
    method, one upload for a one-shot method, plus the personalization round.
    """
    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    rounds = cfg.rounds if method_spec(cfg.method).multiround else 1
    return {"bytes-up-per-client": mean("bytes-up"), "bytes-down-per-client": mean("bytes-down"),
            "model-exchanges": rounds + 1,
            "bytes-counted-from": "flower messages" if measured else "model arrays (formula)",
            "server-seconds": times.get("phase2-server-method"),
            "client-train-seconds-mean": mean("train-seconds"),
            "phase1-seconds": times.get("phase1-local-training"),
            "phase3-seconds": times.get("phase3-personalization")}
