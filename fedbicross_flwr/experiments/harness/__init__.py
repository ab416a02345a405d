"""Experiment harness: a grid of cells (dataset x alpha x N x K x method x seed) from a preset,
run with resume, collected into a CSV, the paper's tables (I-III) and figures.

``fedbicross grid --preset conf/grid-cpu.toml [--out DIR]``; see :mod:`.spec` for the preset
format, :mod:`.runner` for resuming and progress, :mod:`.tables` / :mod:`.plots` /
:mod:`.report` for what is written.
"""

from fedbicross_flwr.experiments.harness.spec import Cell, GridSpec, Row, load_grid_preset

__all__ = ["Cell", "GridSpec", "Row", "load_grid_preset"]
