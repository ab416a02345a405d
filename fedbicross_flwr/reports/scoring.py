"""The server scores the personalized models itself where it holds the test data (simulation).

In a simulation the server assigned the partitions of the run's dataset and holds its official
test split, so it can rebuild every site's evaluation sets (the partition is seeded). It asks
each site to send its personalized model back with the phase-3 metrics (the instruction's
:data:`~fedbicross_flwr.protocol.RETURN_MODEL` key) and scores, with the run's
``eval-precision``:

* ``acc-before`` / ``acc-personal-before``: the model it sent the site (which it holds);
* ``acc-after`` / ``acc-personal-after``: the model the site sent back, after the same checks
  as an upload (:func:`~fedbicross_flwr.protocol.validate_upload` and the probe forward pass).

These replace the site's own figures in ``clients.csv`` and every mean. A site's figure that
differs from the server's by more than :func:`tolerance` (one prediction of the evaluation set,
at least 0.01: floating-point order may flip a near tie) is listed in ``failures`` as a
self-report mismatch; the server's figure is the one used. A site that sends no model, or one
that fails the checks, is left out (``missing``), named with the reason.

In a deployment (the sites name or bring their own data) there is nothing to score on: the
figures stay self-reported (:data:`~fedbicross_flwr.reports.headline.SELF_REPORTED`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.data.datasets import DataError, DatasetArrays, load_dataset
from fedbicross_flwr.data.site import site_from_partition
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.model import load_resnet18
from fedbicross_flwr.protocol import ClientFailure, PhaseResult, StateDict, validate_upload
from fedbicross_flwr.training import evaluate_views

MIN_TOLERANCE = 0.01  # a reported figure within this of the server's is never a mismatch
# phase-3 metric -> (which model: before = sent, after = returned; which evaluation view)
SCORED = {"acc-before": ("before", "test-acc"), "acc-personal-before": ("before",
                                                                       "test-acc-personal"),
          "acc-after": ("after", "test-acc"), "acc-personal-after": ("after",
                                                                     "test-acc-personal")}


def tolerance(n: int) -> float:
    """How far a site's figure on ``n`` examples may be from the server's: one prediction
    (1/n), at least :data:`MIN_TOLERANCE`.
    """
    return max(MIN_TOLERANCE, 1.0 / n) if n > 0 else MIN_TOLERANCE


def differs(reported: float, scored: float, n: int) -> bool:
    """Whether a reported accuracy disagrees with the server's (NaN agrees only with NaN)."""
    if math.isnan(reported) or math.isnan(scored):
        return math.isnan(reported) != math.isnan(scored)
    return abs(reported - scored) > tolerance(n) + 1e-12


@dataclass
class ServerScoring:
    """The server's scoring of one run's phase 3 (see the module docstring).

    Attributes
    ----------
    cfg : RunConfig
        The run (its partition, ``eval-precision`` and ``device``).
    dataset : DatasetArrays
        The run's dataset, as the server loads it (its test split is the official one).
    num_partitions : int
        How many partitions the server assigned in phase 1.
    reference : StateDict
        w^(0): a returned model must have its keys, shapes and dtypes.
    probe : callable
        The probe forward pass every model the server accepts must pass.
    """

    cfg: RunConfig
    dataset: DatasetArrays
    num_partitions: int
    reference: StateDict
    probe: Callable[[StateDict], str | None]

    def score(self, phase3: PhaseResult, sent: dict[int, StateDict], nodes: dict[int, str],
              device: torch.device) -> tuple[list[ClientFailure], list[ClientFailure]]:
        """Replace each reply's four accuracies by the server's; (refused, mismatches).

        A reply without a usable returned model is removed from ``phase3.replies`` and
        returned as refused; a reply whose own figures differ from the server's is kept, with
        the server's figures, and returned as a mismatch.
        """
        refused, mismatches = [], []
        for pid in sorted(phase3.replies):
            state = phase3.models.pop(pid, None)
            problem = ("it sent no personalized model to score" if state is None
                       else validate_upload(state, self.reference, self.probe))
            if state is None or problem is not None:
                del phase3.replies[pid]
                refused.append(ClientFailure(pid, nodes.get(pid, "-"), "personalize",
                                             f"rejected personalized model: {problem}"))
                continue
            reported = phase3.replies[pid]
            scored, sizes = self._scores(pid, sent[pid], state, device)
            wrong = [f"{name} {float(reported[name]):.4g} (server: {scored[name]:.4g})"
                     for name in SCORED if differs(float(reported[name]), scored[name],
                                                   sizes[name])]
            phase3.replies[pid] = {**reported, **scored}
            if wrong:
                mismatches.append(ClientFailure(
                    pid, nodes.get(pid, "-"), "personalize (server scoring)",
                    f"self-reported figures differ from the server's scoring of the same "
                    f"models: {', '.join(wrong)}; the server's figures are used"))
        phase3.models.clear()
        return refused, mismatches

    def _scores(self, pid: int, sent: StateDict, returned: StateDict, device: torch.device
                ) -> tuple[dict[str, float], dict[str, int]]:
        """The four accuracies of partition ``pid``'s models, and each view's size."""
        site = site_from_partition(self.dataset, self.cfg, pid, self.num_partitions)
        precision = self.cfg.eval_precision
        views = {"before": evaluate_views(load_resnet18(sent), site, device, precision,
                                          shared=True),  # many sites may receive one model
                 "after": evaluate_views(load_resnet18(returned), site, device, precision)}
        n = {"test-acc": len(site.y_test), "test-acc-personal": len(site.y_test_personal)}
        return ({name: views[model][view] for name, (model, view) in SCORED.items()},
                {name: n[view] for name, (_, view) in SCORED.items()})


def server_scoring(cfg: RunConfig, num_partitions: int, reference: StateDict,
                   probe: Callable[[StateDict], str | None]) -> ServerScoring | None:
    """The server's scoring when it can score (a simulation), else None (self-reported).

    The server can score when it assigned the partitions in phase 1 (``num_partitions`` > 0)
    and can read the run's dataset; otherwise the reason is logged.
    """
    if num_partitions <= 0:
        log(logging.INFO, "phase-3 accuracies are self-reported: the sites hold their own "
            "data (deployment), the server cannot score their models")
        return None
    try:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.data_path, cfg.allow_download,
                          cfg.in_channels, cfg.num_classes)
    except DataError as err:
        log(logging.WARNING, "phase-3 accuracies are self-reported: the server cannot read "
            "the dataset to score the personalized models (%s)", err)
        return None
    return ServerScoring(cfg, ds, num_partitions, reference, probe)


__all__ = ["ServerScoring", "differs", "server_scoring", "tolerance"]
