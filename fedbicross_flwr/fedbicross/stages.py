"""Checkpointing and timing around the stages of :func:`~.method.run_fedbicross`.

The pipeline in :mod:`.method` reads as Algorithm 1; this module is what keeps it resumable:

* :meth:`StageRunner.run` restores a stage's result from a verified checkpoint, or computes
  and saves it (clustering; each cluster's synthesis in each server epoch);
* :meth:`StageRunner.resume_epochs` / :meth:`StageRunner.finish_epoch` restore the latest
  finished server epoch (cluster models, cross-cluster weights, momentum buffers, histories)
  and save each finished one;
* :class:`StageTimer` adds each stage's wall time to ``stage_times_s``.

The checkpoint files and their contents are described in :mod:`.checkpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..logging_utils import log
from .bilevel import OnlineBilevelTrainer
from .checkpoint import StageCheckpoints


class StageTimer:
    """Wall seconds per stage name, accumulated over calls.

    Parameters
    ----------
    names : Sequence[str]
        Stages listed (at 0 s) even when they never run, in this order.
    """

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.times: dict[str, float] = {name: 0.0 for name in names}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block and add its wall seconds to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to the time of ``name``."""
        self.times[name] = self.times.get(name, 0.0) + seconds


@dataclass
class EpochRecord:
    """What the server epochs accumulate (and what an epoch checkpoint restores)."""

    next_epoch: int = 0  # the first server epoch still to run
    histories: list[dict[str, np.ndarray]] = field(default_factory=list)  # one per KD pass
    synthesis: list[list[dict[str, Any]]] = field(default_factory=list)  # [epoch][cluster]
    examples: list[Tensor] = field(default_factory=list)  # last epoch, per cluster, on CPU
    example_labels: list[Tensor] = field(default_factory=list)
    # noise-teacher-carry: per cluster, the members' BN buffers of the last noise-adapted teacher
    noise_teachers: list[list[dict[str, Tensor]]] = field(default_factory=list)

    def add_synthesis(self, clusters: Sequence[dict[str, Any]], num_examples: int) -> None:
        """One epoch's per-cluster synthesis results: diagnostics and a few final images."""
        self.synthesis.append([c["diag"] for c in clusters])
        # clone(): views would keep each whole (T, B, C, H, W) trajectory alive (and saved).
        self.examples = [c["trajectory"][-1, :num_examples].detach().cpu().clone()
                         for c in clusters]
        self.example_labels = [c["labels"][:num_examples].cpu().clone() for c in clusters]


class StageRunner:
    """Runs named stages once: restored from a checkpoint when one is there, else computed,
    saved and timed.

    Parameters
    ----------
    checkpoints : StageCheckpoints
        The run's checkpoint folder (disabled: every stage is computed, nothing is saved).
    device : torch.device
        Where restored tensors go.
    stage_names : Sequence[str]
        The timed stages, in the order ``times`` lists them.
    """

    def __init__(self, checkpoints: StageCheckpoints, device: torch.device,
                 stage_names: Sequence[str] = ()) -> None:
        self.checkpoints = checkpoints
        self.device = device
        self.timer = StageTimer(stage_names)

    @property
    def times(self) -> dict[str, float]:
        """Wall seconds per stage (restored stages count with their original times)."""
        return self.timer.times

    def timed(self, name: str) -> Any:
        """A context manager adding its wall time to stage ``name``."""
        return self.timer(name)

    def run(self, name: str, compute: Callable[[], dict[str, Any]],
            timed_as: str | None = None,
            check: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """The payload of checkpoint ``name``, restored or computed by ``compute()`` and saved.

        Top-level tensors are saved on CPU and returned on the device. A ``"times"`` entry of
        the payload (stage -> seconds) is added to :attr:`times`; ``timed_as`` adds this
        call's own wall time (restore or compute) to that stage. ``check`` validates a
        restored payload (:mod:`.checkpoint_checks`); a refused one is set aside and the stage
        computed.
        """
        start = time.perf_counter()
        payload = self.checkpoints.load(name, check)
        if payload is None:
            payload = compute()
            self.checkpoints.save(name, {key: value.cpu() if isinstance(value, Tensor) else value
                                         for key, value in payload.items()})
        else:
            log(INFO, "%s restored from checkpoint", name)
            payload = {key: value.to(self.device) if isinstance(value, Tensor) else value
                       for key, value in payload.items()}
        for stage, seconds in payload.get("times", {}).items():
            self.timer.add(stage, seconds)
        if timed_as is not None:
            self.timer.add(timed_as, time.perf_counter() - start)
        return payload

    def resume_epochs(self, num_epochs: int, students: Sequence[nn.Module],
                      trainer: OnlineBilevelTrainer,
                      check: Callable[[Any, int], None] | None = None) -> EpochRecord:
        """Restore the latest finished server epoch into ``students`` and ``trainer``;
        ``check(state, epoch)`` validates a checkpoint before any of it is used (a refused one
        is set aside, and an earlier epoch or none is restored).
        """
        for epoch in reversed(range(num_epochs)):
            state = self.checkpoints.load(
                f"epoch{epoch}-bilevel",
                None if check is None else lambda state, e=epoch: check(state, e))  # type: ignore[misc]
            if state is None:
                continue
            for student, weights in zip(students, state["students"]):
                student.load_state_dict(weights)
            trainer.weights = state["weights"].to(self.device)
            trainer.momentum_buffers = [{name: b.to(self.device) for name, b in buffers.items()}
                                        for buffers in state["momentum_buffers"]]
            self.times.update(state["times"])
            log(INFO, "server epochs 1..%d restored from checkpoint", epoch + 1)
            return EpochRecord(epoch + 1, state["histories"], state["synthesis"],
                               state["examples"], state["example_labels"],
                               state.get("noise_teachers", []))
        return EpochRecord()

    def finish_epoch(self, epoch: int, num_clusters: int, students: Sequence[nn.Module],
                     trainer: OnlineBilevelTrainer, record: EpochRecord) -> None:
        """Save server epoch ``epoch``; its synthesis and the previous epoch are superseded."""
        if not self.checkpoints.enabled:
            return
        self.checkpoints.save(f"epoch{epoch}-bilevel", {
            "students": [{n: v.detach().cpu().clone() for n, v in st.state_dict().items()}
                         for st in students],
            "weights": trainer.weights.cpu(),
            "momentum_buffers": [{n: b.cpu() for n, b in buffers.items()}
                                 for buffers in trainer.momentum_buffers],
            "histories": record.histories, "synthesis": record.synthesis,
            "examples": record.examples, "example_labels": record.example_labels,
            "noise_teachers": record.noise_teachers, "times": dict(self.times)})
        self.checkpoints.drop([f"epoch{epoch}-cluster{k}" for k in range(num_clusters)]
                              + ([f"epoch{epoch - 1}-bilevel"] if epoch else []))
