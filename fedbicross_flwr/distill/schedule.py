"""The students' step learning-rate schedule, shared by FedBiCross and the baselines.

This module imports no torch, so the run-config sections can use it.
"""

from __future__ import annotations

import math


def step_schedule(epoch: int, epochs: int, lr: float, milestones: tuple[float, ...]) -> float:
    """Step decay: ``lr * 0.1^m`` with m = number of milestones (fractions of ``epochs``)
    already reached by the 0-based ``epoch`` (FedISCA and FedBiCross's
    ``student-lr-milestones``: 0.5, 0.75; DAFL: 0.4, 0.8).

    A milestone f is reached from epoch ceil(f * epochs) on, so a 1-epoch run never decays.
    """
    reached = sum(epoch >= math.ceil(fraction * epochs) for fraction in milestones)
    return lr * 0.1**reached
