"""The one-shot protocol on the server, independent of how messages travel.

Phase 1 collects every client's single upload, phase 2 runs the configured server method
(:mod:`fedbicross_flwr.methods`), phase 3 sends each client its own model for
``train.personalize`` and collects the metrics; then the run folder is written. A
:class:`Transport` carries the client phases: Flower's Grid in
:mod:`fedbicross_flwr.engines.grid_transport` (simulation or deployment), or plain function calls in
:mod:`fedbicross_flwr.engines.direct` (one process, no Flower, e.g. on the GPU machine).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedbicross_flwr.client import initial_state
from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import DataError, load_dataset
from fedbicross_flwr.data.site import example_bounds
from fedbicross_flwr.engines.communication import add_traffic
from fedbicross_flwr.engines.transport import Transport
from fedbicross_flwr.logging_utils import (
    add_file_handler,
    log,
    position_text,
    remove_handler,
    run_position,
)
from fedbicross_flwr.methods import collect_uploads, get_method, method_spec
from fedbicross_flwr.methods.base import MethodInput
from fedbicross_flwr.methods.rounds import reply_optional_metrics
from fedbicross_flwr.model import probe_for

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
from fedbicross_flwr.reports.knowledge import knowledge_markdown, write_knowledge
from fedbicross_flwr.reports.results import (
    create_run_dir,
    finished_run_dir,
    percent,
    summarize,
    write_clients_csv,
    write_json,
    write_summary_md,
)
from fedbicross_flwr.storage.checkpoint_io import discard_checkpoints
from fedbicross_flwr.storage.uploads_checkpoint import checkpointed_uploads
from fedbicross_flwr.training import resolve_device


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
    handler = add_file_handler(run_dir / "log.txt")
    entry = (run_dir, rerun_name or run_dir.name)
    _ACTIVE_RUNS.append(entry)
    try:
        return _run(cfg, transport, run_dir)
    except (SystemExit, KeyboardInterrupt):  # SIGTERM/SIGINT: `flwr stop`, a SuperLink gone
        log_stopped_runs()
        raise
    finally:
        if entry in _ACTIVE_RUNS:
            _ACTIVE_RUNS.remove(entry)
        remove_handler(handler)


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
    folder ``<run-name>-comparison`` gets the comparison table (``comparison.csv``,
    ``comparison.md``) and the summary picture (``summary.png``); the table is also logged.
    One method alone gets no comparison.

    Returns
    -------
    dict[str, Path]
        Method -> run folder, and ``"comparison"`` -> the comparison folder (2+ methods).
    """
    from fedbicross_flwr.reports.comparison import write_comparison

    methods = cfg.method_list
    base = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.dataset}"
    run_dirs: dict[str, Path] = {}
    for j, method in enumerate(methods, start=1):
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
    table = write_comparison(out, run_dirs)
    log(logging.INFO, "comparison of %d methods on the same client uploads (%s):\n%s",
        len(methods), out, table)
    return {**run_dirs, "comparison": out}


def _run(cfg: RunConfig, transport: Transport, run_dir: Path) -> Path:
    """The three phases of one method into ``run_dir``; returns it.

    Phase 1 collects one upload per client (each validated against w^(0) and its example
    bound; the rejected ones become failures) and checkpoints them; phase 2 runs the server
    method; phase 3 sends its models back for personalization. ``clients.csv``,
    ``summary.json``/``.md`` and the knowledge report are then written.

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
    method = get_method(cfg.method)
    with run_position(f"phase 2/3 {cfg.method}"):
        out = method(MethodInput(uploads, cfg, in_channels, num_classes, device, run_dir,
                                 round_model=phase1.global_state))
    times["phase2-server-method"] = time.perf_counter() - t0
    missing = sorted({u.partition_id for u in uploads} - set(out.models))
    if missing:
        raise RuntimeError(f"method {cfg.method!r} returned no model for partitions {missing}")
    check_outgoing_models(cfg.method, out.models, uploads, probe, run_dir)

    # Phase 3: personalization ----------------------------------------------------------------
    t0 = time.perf_counter()
    log(logging.INFO, "%sphase 3/3: personalized distillation on the clients",
        position_text())
    phase3 = transport.personalize(cfg, out.models)
    times["phase3-personalization"] = time.perf_counter() - t0
    phase3.failures.extend(refuse_bad_metrics(phase3, local_metrics, phase1.partitions))
    failures.extend(phase3.failures)
    for f in phase3.failures:
        log(logging.WARNING, "client %s (node %s) missing in phase 3: %s", f.partition_id,
            f.node, f.reason)

    # Results ----------------------------------------------------------------------------------
    rows = _client_rows(phase1, phase3, out.clusters, local_metrics, failures)
    write_clients_csv(run_dir / "clients.csv", rows)
    summary = summarize(rows, cfg, {"majority-rate": majority, "wall-times-s": times,
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


def _accepted_uploads(cfg: RunConfig, phase1: PhaseResult, init: StateDict,
                      probe: Callable[[StateDict], str | None]
                      ) -> tuple[list[ClientUpload], dict[int, dict], list[ClientFailure]]:
    """Phase 1's usable uploads, each client's metrics, and the failures (rejected included).

    An upload is rejected when :func:`upload_problem` refuses it: its state against w^(0)
    (:func:`validate_upload`), its ``num-examples`` above ``max-num-examples`` (else the
    partition's size bound), or any metric out of its range (:func:`metrics_problem`).
    """
    failures = list(phase1.failures)
    uploads, local_metrics = [], {}
    sizes = example_bounds(cfg, phase1.num_partitions)
    for pid in sorted(phase1.replies):
        reply: ClientReply = phase1.replies[pid]
        problem = upload_problem(reply, init, probe, cfg.max_num_examples or sizes.get(pid),
                                 reply_optional_metrics(cfg))
        if problem is not None:
            failures.append(ClientFailure(pid, phase1.partitions.get(pid, "-"), "train",
                                          f"rejected upload: {problem}"))
            log(logging.WARNING, "partition %d: rejected upload: %s", pid, problem)
            continue
        uploads.append(ClientUpload(pid, reply.state, int(reply.metrics["num-examples"])))
        local_metrics[pid] = reply.metrics
    for f in phase1.failures:
        log(logging.WARNING, "client %s (node %s) left out in phase 1: %s", f.partition_id,
            f.node, f.reason)
    return uploads, local_metrics, failures


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


def refuse_bad_metrics(phase3: PhaseResult, local_metrics: dict[int, dict[str, float]],
                       nodes: dict[int, str]) -> list[ClientFailure]:
    """Remove the phase-3 replies whose metrics are refused (:func:`metrics_problem`, and
    ``num-examples`` equal to the site's phase-1 count); their failures, with the reason.
    """
    refused = []
    for pid in sorted(phase3.replies):
        metrics, own = phase3.replies[pid], local_metrics.get(pid, {})
        problem = metrics_problem("train.personalize", metrics, own.get("n-test-personal"))
        if problem is None and metrics["num-examples"] != own.get("num-examples"):
            problem = (f"metric num-examples={metrics['num-examples']!r} differs from the "
                       f"{own.get('num-examples')!r} the site uploaded with in phase 1")
        if problem is not None:
            del phase3.replies[pid]
            refused.append(ClientFailure(pid, nodes.get(pid, "-"), "personalize",
                                         f"rejected metrics: {problem}"))
    return refused


def check_outgoing_models(method: str, models: dict[int, StateDict],
                          uploads: list[ClientUpload],
                          probe: Callable[[StateDict], str | None], run_dir: Path) -> None:
    """Refuse to send a model that is not usable: non-finite values, a BatchNorm variance
    <= 0, or a forward pass on the fixed probe batch with non-finite or huge outputs.

    Raises
    ------
    FloatingPointError
        Naming the partitions, the first problem of each and the most extreme of the uploads
        the method was given (the likely culprit); nothing is sent, the run stops unfinished
        and the run folder (with its checkpoints) is kept.
    """
    check_finite_models(method, models, run_dir, uploads)
    bad = {}
    for pid, state in sorted(models.items()):
        variances = [k for k, v in state.items() if k.endswith("running_var")
                     and v.numel() and float(v.min()) <= 0]
        problem = (f"{variances[0]} has a BatchNorm variance <= 0" if variances
                   else probe(state))
        if problem is not None:
            bad[pid] = problem
    if bad:
        raise FloatingPointError(
            f"method {method!r} produced unusable models for partitions {sorted(bad)} "
            f"({bad}); {_most_extreme(uploads)}. Nothing was sent to the clients; the run "
            f"folder {run_dir} and its checkpoints are kept.")


def _most_extreme(uploads: list[ClientUpload]) -> str:
    """The accepted upload with the largest absolute value, to name as the likely culprit."""
    if not uploads:
        return "no uploads"
    scores = {}
    for u in uploads:
        name, value = max(((k, float(v.detach().abs().max())) for k, v in u.state.items()
                           if v.is_floating_point() and v.numel()),
                          key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf)
        scores[u.partition_id] = (value, name)
    pid = max(scores, key=lambda p: scores[p][0])
    value, name = scores[pid]
    return (f"the most extreme upload it was given is partition {pid}'s "
            f"(|{name}| up to {value:.3g})")


def check_finite_models(method: str, models: dict[int, StateDict], run_dir: Path,
                        uploads: list[ClientUpload] | None = None) -> None:
    """Refuse to send a non-finite model to a client (a diverged server stage).

    Raises
    ------
    FloatingPointError
        Naming the partitions and the first non-finite tensor of each; nothing is sent and the
        run folder (with its checkpoints) is kept.
    """
    bad = {}
    for pid, state in sorted(models.items()):
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad[pid] = name
                break
    if bad:
        raise FloatingPointError(
            f"method {method!r} produced non-finite models (NaN/Inf) for partitions "
            f"{sorted(bad)} (first bad tensor per partition: {bad})"
            + (f"; {_most_extreme(uploads)}" if uploads else "")
            + f"; nothing was sent to the clients. The run folder {run_dir} and its checkpoints "
            "are kept.")
