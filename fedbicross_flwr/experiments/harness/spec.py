"""Grid presets: which cells an experiment has, and the run config of each cell.

A grid preset is a TOML file (``conf/grid-*.toml``)::

    [grid]
    datasets = ["digits", "retinamnist"]    # dataset x alpha x N x seed: one set of clients
    alphas = [0.1, 0.5]
    num-clients = [5]
    num-clusters = [2, 3]                   # K: only for the rows listed in k-rows
    seeds = [0, 1]
    methods = ["local", "fedavg1", "fedbicross", "central"]   # one table row each
    k-rows = ["fedbicross"]                 # rows repeated for every K (K <= N)

    [run-config]                            # keys shared by every cell (RunConfig keys)
    local-epochs = 10
    data-dir = "data/medmnist"              # relative paths: from the preset's folder

    [[rows]]                                # extra rows: a method with its own keys,
    name = "intra-cluster"                  # optionally on a part of the grid only
    method = "fedbicross"
    run-config = { weights-mode = "intra" }
    datasets = ["digits"]
    alphas = [0.1]

A cell is (dataset, alpha, N, K, row, seed); K is None for rows that do not use it. Cells with
the same (dataset, alpha, N, seed) and the same local-training settings share their clients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbicross_flwr.config.run_config import ConfigError, RunConfig, load_preset

GRID_KEYS = {"datasets", "alphas", "num-clients", "num-clusters", "seeds", "methods", "k-rows",
             "fig2-rows"}
ROW_KEYS = {"name", "method", "run-config", "datasets", "alphas", "num-clients",
            "num-clusters", "seeds", "uses-k"}
# keys the grid sets per cell; a preset may not set them in [run-config] or a row
CELL_KEYS = {"dataset", "alpha", "num-clients", "num-clusters", "seed", "method", "output-dir",
             "run-name", "resume"}


@dataclass(frozen=True)
class Row:
    """One table row: a server method with its own run-config keys."""

    name: str  # row label (unique), e.g. "fedbicross" or "intra-cluster"
    method: str  # registry name
    overrides: dict[str, Any] = field(default_factory=dict)  # run-config keys of this row
    uses_k: bool = False  # repeated for every K of the grid
    # restrict the row to part of the grid (None: the whole grid)
    datasets: tuple[str, ...] | None = None
    alphas: tuple[float, ...] | None = None
    num_clients: tuple[int, ...] | None = None
    num_clusters: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True, order=True)
class Cell:
    """One run: a row on one (dataset, alpha, N, K, seed)."""

    dataset: str
    alpha: float
    num_clients: int
    num_clusters: int | None  # None: the row does not use K
    row: str
    seed: int

    @property
    def group_dir(self) -> str:
        """Folder of the cells that share their clients."""
        return f"{self.dataset}/a{self.alpha:g}-n{self.num_clients}-s{self.seed}"

    @property
    def run_name(self) -> str:
        """The cell's run folder name: the row, with ``-k<K>`` for rows run per K."""
        return self.row if self.num_clusters is None else f"{self.row}-k{self.num_clusters}"

    @property
    def label(self) -> str:
        """Row label in tables: ``fedbicross (K=2)`` for K rows."""
        return self.row if self.num_clusters is None else f"{self.row} (K={self.num_clusters})"

    def describe(self) -> str:
        """One line naming the cell (dataset, alpha, N, K, row, seed)."""
        k = "" if self.num_clusters is None else f" K={self.num_clusters}"
        return (f"{self.dataset} alpha={self.alpha:g} N={self.num_clients}{k} {self.row} "
                f"seed={self.seed}")


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid preset."""

    name: str
    datasets: tuple[str, ...]
    alphas: tuple[float, ...]
    num_clients: tuple[int, ...]
    num_clusters: tuple[int, ...]
    seeds: tuple[int, ...]
    rows: tuple[Row, ...]
    base: dict[str, Any] = field(default_factory=dict)  # [run-config]
    fig2_rows: tuple[str, ...] = ()  # rows of the Fig. 2 bar chart (empty: every K row)

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def cells(self) -> list[Cell]:
        """Every cell, grouped so that cells sharing clients are adjacent."""
        out = []
        for ds in self.datasets:
            for alpha in self.alphas:
                for n in self.num_clients:
                    for seed in self.seeds:
                        for row in self.rows:
                            if not _selected(row, ds, alpha, n, seed):
                                continue
                            ks: list[int | None] = (
                                [k for k in (row.num_clusters or self.num_clusters) if k <= n]
                                if row.uses_k else [None])
                            out += [Cell(ds, alpha, n, k, row.name, seed) for k in ks]
        return out

    def run_config(self, cell: Cell, output_dir: Path) -> RunConfig:
        """The validated run config of ``cell``, writing into ``output_dir/<group>/``.

        Raises
        ------
        ConfigError
            A key of the preset is invalid (the message names it and the cell).
        """
        row = self.row(cell.row)
        k = cell.num_clusters if cell.num_clusters is not None else min(
            int(row.overrides.get("num-clusters", self.base.get("num-clusters", 2))),
            cell.num_clients)
        values = {**self.base, **row.overrides, "dataset": cell.dataset, "alpha": cell.alpha,
                  "num-clients": cell.num_clients, "num-clusters": k, "seed": cell.seed,
                  "method": row.method, "output-dir": str(output_dir / cell.group_dir),
                  "run-name": cell.run_name, "resume": True}
        try:
            return RunConfig.from_run_config(values)
        except ConfigError as err:
            raise ConfigError(f"grid {self.name}, cell {cell.describe()}: {err}") from err


def _selected(row: Row, ds: str, alpha: float, n: int, seed: int) -> bool:
    return ((row.datasets is None or ds in row.datasets)
            and (row.alphas is None or alpha in row.alphas)
            and (row.num_clients is None or n in row.num_clients)
            and (row.seeds is None or seed in row.seeds))


def _tuple(value: Any, key: str, kind: type) -> tuple:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"grid preset: {key!r} must be a non-empty list, got {value!r}")
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"grid preset: {key!r} must hold {kind.__name__} values: "
                          f"{err}") from err


def _resolve_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative data-dir / data-path are taken from the preset's folder."""
    out = dict(values)
    for key in ("data-dir", "data-path"):
        if out.get(key) and not Path(out[key]).is_absolute():
            out[key] = str((folder / out[key]).resolve())
    return out


def load_grid_preset(path: str | Path) -> GridSpec:
    """Read and check a grid preset; every cell's run config is validated here.

    Raises
    ------
    ConfigError
        An unknown or missing key, a bad value, or a cell whose run config is invalid.
    """
    path = Path(path)
    data = load_preset(path, "grid preset")
    unknown = set(data) - {"grid", "run-config", "rows"}
    if unknown or "grid" not in data:
        raise ConfigError(f"grid preset {path}: needs a [grid] table; unknown tables "
                          f"{sorted(unknown)}")
    grid = data["grid"]
    if set(grid) - GRID_KEYS:
        raise ConfigError(f"grid preset {path}: unknown [grid] keys {sorted(set(grid) - GRID_KEYS)}"
                          f"; known: {sorted(GRID_KEYS)}")
    base = _resolve_paths(data.get("run-config", {}), path.parent)
    fixed = CELL_KEYS & (set(base) - {"num-clusters"})
    if fixed:
        raise ConfigError(f"grid preset {path}: [run-config] may not set {sorted(fixed)} "
                          "(the grid sets them per cell)")
    k_rows = set(grid.get("k-rows", ["fedbicross"]))
    rows = [Row(m, m, uses_k=m in k_rows) for m in _tuple(grid.get("methods"), "methods", str)]
    for extra in data.get("rows", []):
        if set(extra) - ROW_KEYS or "name" not in extra or "method" not in extra:
            raise ConfigError(f"grid preset {path}: a [[rows]] entry needs name and method; "
                              f"allowed keys {sorted(ROW_KEYS)}, got {sorted(extra)}")
        overrides = _resolve_paths(extra.get("run-config", {}), path.parent)
        fixed = (CELL_KEYS - {"num-clusters"}) & set(overrides)  # K=1: "w/o Clus"
        if fixed:
            raise ConfigError(f"grid preset {path}: row {extra['name']!r} may not set "
                              f"{sorted(fixed)}")
        opt = {k.replace("-", "_"): _tuple(extra[k], k, t) for k, t in (
            ("datasets", str), ("alphas", float), ("num-clients", int),
            ("num-clusters", int), ("seeds", int)) if k in extra}
        rows.append(Row(str(extra["name"]), str(extra["method"]), overrides,
                        bool(extra.get("uses-k", "num-clusters" in extra)), **opt))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid preset {path}: row names must be unique, got {names}")
    spec = GridSpec(path.stem, _tuple(grid.get("datasets"), "datasets", str),
                    _tuple(grid.get("alphas"), "alphas", float),
                    _tuple(grid.get("num-clients", [5]), "num-clients", int),
                    _tuple(grid.get("num-clusters", [base.get("num-clusters", 2)]),
                           "num-clusters", int),
                    _tuple(grid.get("seeds", [0]), "seeds", int), tuple(rows), base,
                    tuple(grid.get("fig2-rows", [])))
    for cell in spec.cells():  # fail before any training, naming the key and the cell
        spec.run_config(cell, Path("/tmp"))
    return spec


def replace(spec: GridSpec, **changes: Any) -> GridSpec:
    """A copy of ``spec`` with some fields changed (e.g. fewer seeds for a quick try)."""
    return dataclasses.replace(spec, **changes)
