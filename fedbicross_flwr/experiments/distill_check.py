"""``fedbicross distill-check``: whether a synthesis + KD engine distils ONE strong teacher.

Before any federated claim, the engine must carry what a single good teacher knows into a
fresh student through synthetic data alone. This trains one ResNet-18 on the official train
split (the ``central`` upper bound, cached), hands it to a distilling server method as the only
client upload, and scores the model the method returns on the official test split:

* ``teacher-acc``: the teacher on the official test split (the ceiling);
* ``student-acc``: the distilled model, before any personalization;
* ``retention`` = student-acc / teacher-acc;
* ``agreement-real``: share of test images where student and teacher predict the same class.

The method runs through its Flower strategy's server method, as in a federated run (same code,
same keys), with one upload, ``num-clusters=1`` and a random student start (a student started
from its only teacher would retain everything without distilling anything). Every row is appended to
``distill-check.csv`` in the output folder, so several calls build a retention-vs-budget table.

A long check resumes: with ``resume=true run-name=NAME`` the run folder is ``OUT/NAME`` and the
method restores its finished server epochs from ``OUT/NAME/checkpoints`` (the teacher is
cached in ``OUT/teachers``); without them each call gets a new time-stamped folder.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.data.datasets import DatasetArrays, load_dataset
from fedbicross_flwr.data.site import to_tensors
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.methods import method_names
from fedbicross_flwr.methods.base import ClientUpload, MethodInput
from fedbicross_flwr.model import build_resnet18, load_resnet18
from fedbicross_flwr.reports.knowledge import agreement, retention
from fedbicross_flwr.reports.results import logging_to
from fedbicross_flwr.storage.atomic import open_text, save_figure, write_text
from fedbicross_flwr.storage.checkpoint_io import (
    CheckpointRefused,
    discard_checkpoints,
    load_with_sidecar,
    save_with_sidecar,
)
from fedbicross_flwr.strategies import strategy_for
from fedbicross_flwr.training import SGDSettings, predict_logits, resolve_device, train_local

#: Run-config keys reported in each row (the budget and the synthesis settings).
REPORTED_KEYS = ("model-width", "synth-steps", "synth-batch", "kd-batch", "synth-lr", "bn-weight", "kd-passes",
                 "server-epochs", "kd-temperature", "student-lr", "student-lr-milestones",
                 "student-momentum", "noise-teacher-mode", "noise-teacher-carry",
                 "fedisca-epochs", "gen-epochs", "dafl-epochs")


@dataclass(frozen=True)
class CheckResult:
    """One row of ``distill-check.csv``."""

    dataset: str
    synthesis: str
    teacher_acc: float
    student_acc: float
    retention: float
    agreement_real: float
    method_seconds: float
    settings: dict[str, Any]
    target_agreement: float | None = None  # the teacher's agreement with the targets on x^(T)
    # Probes of where the student loses (scoring only, the student is not changed): its test
    # accuracy with batch-statistics BN, and with BN statistics re-estimated on the real train
    # images (a probe that uses data a server does not have).
    student_acc_batch_bn: float | None = None
    student_acc_real_bn: float | None = None

    def row(self) -> dict[str, Any]:
        """Flat CSV row (kebab-case columns)."""
        return {"dataset": self.dataset, "synthesis": self.synthesis,
                "teacher-acc": round(self.teacher_acc, 4),
                "student-acc": round(self.student_acc, 4),
                "retention": round(self.retention, 4),
                "agreement-real": round(self.agreement_real, 4),
                "target-agreement": (None if self.target_agreement is None
                                     else round(self.target_agreement, 4)),
                **{key: None if value is None else round(value, 4) for key, value in (
                    ("student-acc-batch-bn", self.student_acc_batch_bn),
                    ("student-acc-real-bn", self.student_acc_real_bn))},
                "method-seconds": round(self.method_seconds, 1), **self.settings}


def central_teacher(ds: DatasetArrays, cfg: RunConfig, epochs: int, device: torch.device,
                    cache_dir: Path) -> nn.Module:
    """One ResNet-18 trained on the whole official train split (cached with its sha256).

    SGD with the run config's local settings (``local-lr``, momentum, weight decay,
    ``batch-size``, ``precision``) for ``epochs`` epochs, seeded by ``seed``. A cached file
    whose checksum does not match is retrained.
    """
    width = "" if cfg.model_width == 64 else f"-w{cfg.model_width}"
    name = (f"teacher-{ds.name}{width}-seed{cfg.seed}-e{epochs}-lr{cfg.local_lr:g}"
            f"-b{cfg.batch_size}-{cfg.precision}")
    path, digest_path = cache_dir / f"{name}.pt", cache_dir / f"{name}.sha256"
    model = build_resnet18(ds.in_channels, ds.num_classes, cfg.model_width)
    if path.is_file():
        try:
            model.load_state_dict(load_with_sidecar(path, digest_path))
            log(logging.INFO, "distill-check: teacher loaded from %s", path)
            return model.eval()
        except CheckpointRefused as err:
            log(logging.WARNING, "distill-check: %s; retraining the teacher", err)
    x, y = to_tensors(ds.train.images, ds.train.labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_resnet18(ds.in_channels, ds.num_classes, cfg.model_width)
    opt = SGDSettings(epochs, cfg.local_lr, cfg.local_momentum, cfg.local_weight_decay,
                      cfg.batch_size, seed=cfg.seed)
    train_local(model, x, y, opt, device, cfg.precision, desc="[teacher]", progress=cfg.progress)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_with_sidecar(state, path, digest_path)
    return model.eval()


def check_run_dir(cfg: RunConfig, out_dir: Path, dataset: str, synthesis: str) -> Path:
    """The check's run folder: ``OUT/<run-name>`` when resuming (created or reused, its
    checkpoints restored by the method), else a new ``OUT/<time>-<dataset>-<synthesis>``.
    """
    if cfg.resume:  # RunConfig has checked that run-name is set
        run_dir = out_dir / cfg.run_name
        if run_dir.exists():
            log(logging.INFO, "distill-check: resuming %s from its checkpoints", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    run_dir = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset}-{synthesis}"
    run_dir.mkdir(parents=True)
    return run_dir


def method_config(cfg: RunConfig, synthesis: str, run_name: str, output_dir: Path) -> RunConfig:
    """The run config the method sees: one client, one cluster, a random student start."""
    if synthesis not in method_names(distils=True):  # the only ones the check applies to
        raise ConfigError(f"--synthesis must be one of {method_names(distils=True)}, "
                          f"got {synthesis!r}")
    return cfg.replace(method=synthesis, num_clients=1, min_clients=0, num_clusters=1,
                       student_init="random", run_name=run_name, resume=False,
                       output_dir=str(output_dir))


def run_check(cfg: RunConfig, synthesis: str, teacher_epochs: int, out_dir: Path) -> CheckResult:
    """Distil the central teacher with ``synthesis`` and score the result (see module doc)."""
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                      cfg.in_channels, cfg.num_classes)
    teacher = central_teacher(ds, cfg, teacher_epochs, device, out_dir / "teachers")
    x_test, y_test = to_tensors(ds.test.images, ds.test.labels)
    teacher_logits = predict_logits(teacher, x_test, device, precision=cfg.eval_precision).float().cpu()
    teacher_acc = float((teacher_logits.argmax(1) == y_test).float().mean())

    run_dir = check_run_dir(cfg, out_dir, ds.name, synthesis)
    mcfg = method_config(cfg, synthesis, run_dir.name, out_dir)
    upload = ClientUpload(partition_id=0, num_examples=len(ds.train.labels),
                          state={k: v.detach().cpu() for k, v in teacher.state_dict().items()})
    inp = MethodInput(uploads=[upload], cfg=mcfg, in_channels=ds.in_channels,
                      num_classes=ds.num_classes, device=device, run_dir=run_dir)
    log(logging.INFO, "distill-check: %s on %s, teacher %.2f %% on the official test split",
        synthesis, ds.name, 100 * teacher_acc)
    start = time.perf_counter()
    with logging_to(run_dir / "log.txt"):
        output = strategy_for(mcfg).server_method(inp)
    seconds = time.perf_counter() - start
    if not cfg.keep_checkpoints:
        discard_checkpoints(run_dir / "checkpoints")

    student = load_resnet18(output.models[0])
    student_logits = predict_logits(student, x_test, device, precision=cfg.eval_precision).float().cpu()
    student_acc = float((student_logits.argmax(1) == y_test).float().mean())
    batch_bn, real_bn = bn_probes(student, ds, device, cfg.batch_size)
    values = mcfg.to_run_config()
    result = CheckResult(
        dataset=ds.name, synthesis=synthesis, teacher_acc=teacher_acc, student_acc=student_acc,
        retention=retention(student_acc, teacher_acc),
        agreement_real=agreement(student_logits, teacher_logits.softmax(1)),
        method_seconds=seconds, settings={k: values[k] for k in REPORTED_KEYS},
        target_agreement=_target_agreement(output.diagnostics),
        student_acc_batch_bn=batch_bn, student_acc_real_bn=real_bn)
    write_text(run_dir / "distill-check.json", json.dumps(
        {**result.row(), "diagnostics": output.diagnostics}, indent=1, default=str))
    log(logging.INFO, "distill-check: %s on %s: student %.2f %% of teacher %.2f %% "
        "(retention %.3f), agreement on real test images %.3f, %.0f s", synthesis, ds.name,
        100 * student_acc, 100 * teacher_acc, result.retention, result.agreement_real, seconds)
    return result


@torch.no_grad()
def bn_probes(student: nn.Module, ds: DatasetArrays, device: torch.device,
              batch_size: int) -> tuple[float, float]:
    """The student's official-test accuracy with batch-statistics BN (test batches of
    ``batch_size`` in a seeded random order: an archive may store its test split sorted by
    class), and with its BN statistics re-estimated on the real train images (one pass,
    cumulative average); both on copies, fp32.
    """
    x_test, y_test = to_tensors(ds.test.images, ds.test.labels)
    order = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))
    x_test, y_test = x_test[order], y_test[order]
    x_train, _ = to_tensors(ds.train.images, ds.train.labels)

    def accuracy(model: nn.Module) -> float:
        hits = 0
        for lo in range(0, len(y_test), batch_size):
            logits = model(x_test[lo:lo + batch_size].to(device))
            hits += int((logits.argmax(1).cpu() == y_test[lo:lo + batch_size]).sum())
        return hits / len(y_test)

    batch_stats = copy.deepcopy(student).to(device).train()  # buffers of the copy may move
    with_batch = accuracy(batch_stats)
    real = copy.deepcopy(student).to(device).train()
    for module in real.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the pass
    for lo in range(0, len(x_train), batch_size):
        real(x_train[lo:lo + batch_size].to(device))
    return with_batch, accuracy(real.eval())


def _target_agreement(diagnostics: dict[str, Any]) -> float | None:
    """The teacher's agreement with its synthesis targets on the final images, if reported
    (FedBiCross: ``synthesis-summary``; FedISCA: ``final_teacher_accuracy``).
    """
    summary = diagnostics.get("synthesis-summary")
    if summary:
        return summary[-1].get("teacher-accuracy")
    return diagnostics.get("final_teacher_accuracy")


def plot_rows(csv_path: Path, png_path: Path) -> Path:
    """Retention against the method's wall time, one marker per row, labelled T, B / kd-batch,
    a_BN, passes, the server epochs when more than one and the width when it is not 64; a
    hollow marker above or below each gives the retention with the student's BN statistics
    re-estimated on real images, where the row has it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    fig, ax = plt.subplots(figsize=(6, 4))
    for synthesis in sorted({r["synthesis"] for r in rows}):
        mine = [r for r in rows if r["synthesis"] == synthesis]
        dots = ax.scatter([float(r["method-seconds"]) / 60 for r in mine],
                          [float(r["retention"]) for r in mine], label=synthesis)
        probed = [r for r in mine if r.get("student-acc-real-bn")]
        if probed:
            ax.scatter([float(r["method-seconds"]) / 60 for r in probed],
                       [float(r["student-acc-real-bn"]) / float(r["teacher-acc"]) for r in probed],
                       facecolors="none", edgecolors=dots.get_facecolor(),
                       label=f"{synthesis}, BN re-estimated on real images")
        for r in mine:
            passes = f" x{r['kd-passes']} passes" if r.get("kd-passes") not in ("1", None) else ""
            kd = f"/{r['kd-batch']}" if r.get("kd-batch") not in ("0", "", None) else ""
            width = f" w{r['model-width']}" if r.get("model-width") not in ("64", "", None) else ""
            epochs = r.get("server-epochs")
            width += f" E{epochs}" if epochs not in ("1", "", None) else ""
            width += " literal F~" if r.get("noise-teacher-mode") == "eval" else ""
            width += f" lr{r['student-lr']}" if r.get("student-lr") not in ("0.001", "", None) else ""
            ax.annotate(f"T{r['synth-steps']} B{r['synth-batch']}{kd} a{r['bn-weight']}{passes}"
                        f"{width}",
                        (float(r["method-seconds"]) / 60, float(r["retention"])), fontsize=6)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("server-stage wall time (min)")
    ax.set_ylabel("retention (student / teacher accuracy)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, png_path, dpi=120)
    finally:
        plt.close(fig)
    return png_path


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row to a CSV; a row with new columns rewrites the file with all of them
    (older rows get empty cells there).
    """
    rows: list[dict[str, Any]] = []
    fields = list(row)
    if path.is_file():
        with path.open() as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = list(reader.fieldnames or []) + [k for k in row
                                                       if k not in (reader.fieldnames or [])]
    with open_text(path, newline="") as fh:  # the earlier rows survive a full disk
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows + [row])


def markdown_rows(rows: list[dict[str, Any]]) -> str:
    """The check's rows as a Markdown table."""
    cols = ["dataset", "synthesis", "server-epochs", "teacher-acc", "student-acc", "retention",
            "agreement-real", "target-agreement", "student-acc-batch-bn",
            "student-acc-real-bn", "method-seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fedbicross distill-check``."""
    parser.add_argument("--dataset", default="digits", help="dataset key (run-config `dataset`)")
    parser.add_argument("--synthesis", default="fedbicross",
                        help=f"comma-separated methods, from {', '.join(method_names(distils=True))}")
    parser.add_argument("--preset", help="a TOML file of run-config keys (conf/*.toml)")
    parser.add_argument("--run-config", default="", help="overrides, as for `flwr run`")
    parser.add_argument("--teacher-epochs", type=int, default=15,
                        help="epochs of the central teacher on the official train split")
    parser.add_argument("--out", default="outputs/distill-check",
                        help="folder of the teacher cache, the run folders and distill-check.csv")


def run_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Run the check for every requested synthesis path; print and append the rows."""
    out = Path(args.out).resolve()
    methods = [s.strip() for s in args.synthesis.split(",") if s.strip()]
    for synthesis in methods:  # every name checked before any training
        method_config(cfg, synthesis, "check", out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for synthesis in methods:
        result = run_check(cfg, synthesis, args.teacher_epochs, out)
        append_row(out / "distill-check.csv", result.row())
        rows.append(result.row())
    print(markdown_rows(rows))
    print(f"rows appended to {out / 'distill-check.csv'}; retention against wall time: "
          f"{plot_rows(out / 'distill-check.csv', out / 'distill-check.png')}")
    return 0
