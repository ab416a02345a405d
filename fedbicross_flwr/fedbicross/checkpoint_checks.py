"""What each server-stage checkpoint must hold before a resumed run uses it.

:mod:`.checkpoint` verifies that a file is the one the manifest recorded (sha256) and that it
is plain tensor data without NaN/Inf; this module checks that its content is what this run
would have computed: every key, type, shape and dtype, and every value in its possible range.
A payload that fails raises :class:`~fedbicross_flwr.storage.payload_checks.PayloadError`
naming the place and the problem; the caller sets the file aside and recomputes the stage.

``manifest.json``      a dict: ``fingerprint`` (str) and ``files`` (checkpoint name -> sha256)
``clustering``         ``preds`` (N, M * C) float64 softmax rows, ``assignment`` (N,) int64 in
                       [0, K) using every cluster, numbered by smallest client, ``degenerate``
                       exactly the clients its predictions show to be degenerate
``epoch<e>-cluster<k>`` ``trajectory`` (T, B, C_in, H, W), ``labels`` (B,) in [0, C), soft
                       labels (T, B, C) in [0, 1], ``diag`` (numbers, T per-step losses),
                       ``times``; with ``noise-teacher-carry`` the members' BN buffers
``epoch<e>-bilevel``   K student state dicts of the cluster model's names, shapes and dtypes
                       whose forward pass on the fixed probe batch is finite and bounded
                       (:func:`~fedbicross_flwr.model.forward_problem`), (K, K) weights with
                       rows on the simplex, momentum buffers shaped like the parameters,
                       (e + 1) * kd_passes histories, e + 1 epochs of synthesis diagnostics,
                       the example images and labels, and ``times``
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model import forward_problem
from ..storage.payload_checks import (
    PayloadError,
    array,
    items,
    labels,
    number,
    plain,
    record,
    seconds,
    tensor,
    tensors_like,
    whole,
    within,
)
from .clustering import degenerate_clients
from .config import FedBiCrossSettings

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # a checkpoint's name: a plain file stem
SHA256 = re.compile(r"[0-9a-f]{64}")
SIMPLEX_TOLERANCE = 1e-6  # rounding of the float64 weights; a real change is far larger
SOFTMAX_TOLERANCE = 1e-3  # a float32 softmax row sums to 1 within this


@dataclass(frozen=True)
class StageLayout:
    """What one run's checkpoints must hold: its settings and sizes.

    Attributes
    ----------
    settings : FedBiCrossSettings
        K, M, T, B, server epochs, KD passes, ``noise-teacher-carry``, ...
    num_clients, num_classes, in_channels, image_size : int
        N, C, C_in and H = W.
    image_dtype : torch.dtype
        The trajectory's dtype (the client models' parameters').
    """

    settings: FedBiCrossSettings
    num_clients: int
    num_classes: int
    in_channels: int
    image_size: int
    image_dtype: torch.dtype

    @property
    def probs_dtype(self) -> torch.dtype:
        """The soft labels' dtype: float64 for a float64 trajectory, else float32."""
        return torch.float64 if self.image_dtype == torch.float64 else torch.float32


def check_manifest(data: Any) -> tuple[str, dict[str, str]]:
    """The manifest's fingerprint and its files (name -> sha256).

    Raises
    ------
    PayloadError
        Not a dict with exactly ``fingerprint`` (a str) and ``files`` (plain names mapped to
        sha256 hex digests).
    """
    record(data, "the manifest", ("fingerprint", "files"))
    if not isinstance(data["fingerprint"], str):
        raise PayloadError(f"the manifest's fingerprint is a {type(data['fingerprint']).__name__}"
                           ", not a str")
    files = data["files"]
    if not isinstance(files, dict):
        raise PayloadError(f"the manifest's files are a {type(files).__name__}, not a dict")
    for name, digest in files.items():
        if not (isinstance(name, str) and NAME.fullmatch(name)):
            raise PayloadError(f"the manifest names a checkpoint {name!r}, not a plain file name")
        if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            raise PayloadError(f"the manifest's sha256 of {name} is {digest!r}, not 64 hex digits")
    return data["fingerprint"], dict(files)


def check_clustering(payload: Any, layout: StageLayout) -> None:
    """Stage 1a's ``preds``, ``assignment`` and ``degenerate`` (see the module docstring)."""
    n, k, c = layout.num_clients, layout.settings.num_clusters, layout.num_classes
    record(payload, "", ("preds", "assignment", "degenerate"))
    preds = array(payload["preds"], "['preds']", (n, layout.settings.noise_samples * c),
                  np.float64)
    within(preds, "['preds']", 0.0, 1.0)
    sums = preds.reshape(n, -1, c).sum(axis=2)
    if sums.size and float(np.abs(sums - 1.0).max()) > SOFTMAX_TOLERANCE:
        raise PayloadError("['preds'] holds rows that are not softmax outputs (a row of C "
                           f"values sums to {float(sums.flat[np.abs(sums - 1).argmax()]):g})")
    assignment = array(payload["assignment"], "['assignment']", (n,), np.int64)
    within(assignment, "['assignment']", 0, k - 1)
    empty = sorted(set(range(k)) - set(assignment.tolist()))
    if empty:
        raise PayloadError(f"['assignment'] leaves cluster(s) {empty} of K={k} empty")
    firsts = [int(np.flatnonzero(assignment == j)[0]) for j in range(k)]
    if firsts != sorted(firsts):
        raise PayloadError("['assignment'] does not number the clusters by their smallest "
                           f"client (first clients {firsts})")
    degenerate = items(payload["degenerate"], "['degenerate']")
    for i, client in enumerate(degenerate):
        whole(client, f"['degenerate'][{i}]", 0, n - 1)
    if list(degenerate) != degenerate_clients(preds, c):
        raise PayloadError(f"['degenerate'] lists clients {list(degenerate)}, its predictions "
                           f"show {degenerate_clients(preds, c)}")


def check_cluster(payload: Any, layout: StageLayout, members: Sequence[nn.Module]) -> None:
    """One cluster's synthesis in one server epoch (Stages 1b-1c) for ``members``."""
    s = layout.settings
    t, b, c, side = s.synth_steps, s.synth_batch, layout.num_classes, layout.image_size
    record(payload, "", ("trajectory", "labels", "diag", "teacher_probs", "noise_probs",
                         "times") + (("noise_buffers",) if s.noise_teacher_carry else ()))
    tensor(payload["trajectory"], "['trajectory']", (t, b, layout.in_channels, side, side),
           layout.image_dtype)
    labels(payload["labels"], "['labels']", b, c)
    for key in ("teacher_probs", "noise_probs"):
        within(tensor(payload[key], f"[{key!r}]", (t, b, c), layout.probs_dtype),
               f"[{key!r}]", 0.0, 1.0)
    check_diag(payload["diag"], "['diag']", t)
    seconds(payload["times"], "['times']")
    if s.noise_teacher_carry:
        _member_buffers(payload["noise_buffers"], "['noise_buffers']", members)


def check_diag(diag: Any, where: str, steps: int) -> None:
    """A cluster's synthesis diagnostics: T per-step losses each, numbers in their ranges."""
    record(diag, where, ("ce", "bn", "tv", "teacher_accuracy", "teacher_entropy",
                         "max_entropy", "chance_accuracy", "wall_time_s", "soft_label_profile"))
    for key in ("ce", "bn", "tv"):
        for i, value in enumerate(items(diag[key], f"{where}[{key!r}]", steps)):
            number(value, f"{where}[{key!r}][{i}]")
    for key in ("teacher_accuracy", "chance_accuracy"):
        number(diag[key], f"{where}[{key!r}]", 0.0, 1.0)
    for key in ("teacher_entropy", "max_entropy", "wall_time_s"):
        number(diag[key], f"{where}[{key!r}]", 0.0)
    plain(diag["soft_label_profile"], f"{where}['soft_label_profile']")


def _member_buffers(value: Any, where: str, members: Sequence[nn.Module]) -> None:
    """One state per member: exactly its buffers' names, shapes and dtypes."""
    for i, (state, member) in enumerate(zip(items(value, where, len(members)), members)):
        tensors_like(state, f"{where}[{i}]", dict(member.named_buffers()))


def check_bilevel(payload: Any, layout: StageLayout, epoch: int,
                  members: Sequence[Sequence[nn.Module]], student: nn.Module) -> None:
    """The state after server epoch ``epoch`` (0-based) of the bi-level stage; ``members``
    are the clusters' client models, ``student`` a cluster model G_k (the names, shapes and
    dtypes of its state, and the model a checkpointed state is loaded into to probe it).
    """
    s = layout.settings
    k, t = s.num_clusters, s.synth_steps
    record(payload, "", ("students", "weights", "momentum_buffers", "histories", "synthesis",
                         "examples", "example_labels", "noise_teachers", "times"))
    _simplex_rows(tensor(payload["weights"], "['weights']", (k, k), torch.float64), "['weights']")
    parameters = dict(student.named_parameters())
    for j, buffers in enumerate(items(payload["momentum_buffers"], "['momentum_buffers']", k)):
        tensors_like(buffers, f"['momentum_buffers'][{j}]", parameters, subset=True)
    histories = items(payload["histories"], "['histories']", (epoch + 1) * s.kd_passes)
    for i, history in enumerate(histories):
        where = f"['histories'][{i}]"
        record(history, where, ("weights", "val_loss", "source_loss"))
        _simplex_rows(array(history["weights"], f"{where}['weights']", (t, k, k), np.float64),
                      f"{where}['weights']")
        within(array(history["val_loss"], f"{where}['val_loss']", (t, k), np.float64),
               f"{where}['val_loss']", -np.inf, np.inf)
        within(array(history["source_loss"], f"{where}['source_loss']", (t, k, k), np.float64),
               f"{where}['source_loss']", -np.inf, np.inf)
    for e, epoch_diags in enumerate(items(payload["synthesis"], "['synthesis']", epoch + 1)):
        for j, diag in enumerate(items(epoch_diags, f"['synthesis'][{e}]", k)):
            check_diag(diag, f"['synthesis'][{e}][{j}]", t)
    n = min(s.num_examples, s.synth_batch)
    side = layout.image_size
    for j, images in enumerate(items(payload["examples"], "['examples']", k)):
        tensor(images, f"['examples'][{j}]", (n, layout.in_channels, side, side),
               layout.image_dtype)
    for j, targets in enumerate(items(payload["example_labels"], "['example_labels']", k)):
        labels(targets, f"['example_labels'][{j}]", n, layout.num_classes)
    carried = items(payload["noise_teachers"], "['noise_teachers']",
                    k if s.noise_teacher_carry else 0)
    for j, buffers in enumerate(carried):
        _member_buffers(buffers, f"['noise_teachers'][{j}]", members[j])
    seconds(payload["times"], "['times']")
    _students(payload["students"], layout, student)


def _simplex_rows(weights: torch.Tensor | np.ndarray, where: str) -> None:
    """Every row (last axis) non-negative and summing to 1."""
    within(weights, where, 0.0, 1.0, SIMPLEX_TOLERANCE)
    values = weights if isinstance(weights, np.ndarray) else weights.detach().cpu().numpy()
    sums = values.sum(axis=-1)
    if sums.size and float(np.abs(sums - 1.0).max()) > SIMPLEX_TOLERANCE:
        raise PayloadError(f"{where} holds rows that are not on the simplex (a row sums to "
                           f"{float(sums.flat[np.abs(sums - 1).argmax()]):g})")


def _students(value: Any, layout: StageLayout, student: nn.Module) -> None:
    """K cluster models: the student's exact state layout, and a usable forward pass."""
    reference = student.state_dict()
    for j, state in enumerate(items(value, "['students']", layout.settings.num_clusters)):
        tensors_like(state, f"['students'][{j}]", reference)
        model = copy.deepcopy(student).cpu()
        model.load_state_dict(state)
        problem = forward_problem(model, layout.in_channels, layout.image_size)
        if problem is not None:
            raise PayloadError(f"['students'][{j}] is not a usable model: {problem}")


__all__ = ["StageLayout", "check_bilevel", "check_cluster", "check_clustering", "check_diag",
           "check_manifest"]
