"""Run ``fedbicross`` CLI commands on the lent GPU machine, which has no flwr-datasets.

The client partition comes from flwr-datasets' ``DirichletPartitioner``
(:func:`fedbicross_flwr.partition.dirichlet_partition`). The GPU machine has neither
flwr-datasets nor Hugging Face ``datasets``, so this wrapper replays partitions recorded here,
on the dev machine, by the real function:

    python bench/device_run.py record digits 5 0.1 0     # writes bench/partitions.json
    python bench/device_run.py cli run --preset conf/paper.toml ...   # on the GPU machine

A replayed partition is keyed by the SHA-256 of the train labels and every argument of the
function, so a different dataset, split or argument finds no entry and stops the run rather
than silently using another partition. Where flwr-datasets is importable, the real function
is used and the table is only checked against it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

TABLE = Path(__file__).with_name("partitions.json")


def _key(labels: np.ndarray, n: int, alpha: float, seed: int, min_size: int) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()
    return f"{digest[:16]}|n={n}|alpha={float(alpha)}|seed={int(seed)}|min={int(min_size)}"


def record(dataset: str, n: int, alpha: float, seed: int) -> None:
    """Compute a partition with the real function and add it to the table."""
    from fedbicross_flwr.config import RunConfig
    from fedbicross_flwr.data import load_dataset
    from fedbicross_flwr.partition import dirichlet_partition

    cfg = RunConfig()
    labels = load_dataset(dataset).train.labels
    parts = dirichlet_partition(labels, n, alpha, seed, cfg.min_partition_size)
    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
    table[_key(labels, n, alpha, seed, cfg.min_partition_size)] = [p.tolist() for p in parts]
    TABLE.write_text(json.dumps(table))
    print(f"recorded {dataset} n={n} alpha={alpha} seed={seed}: sizes "
          f"{[len(p) for p in parts]} -> {TABLE}")


def install_replay() -> None:
    """Make ``dirichlet_partition`` replay the table where flwr-datasets is missing."""
    import fedbicross_flwr.partition as partition

    real = partition.dirichlet_partition
    table = json.loads(TABLE.read_text())

    def replay(labels, num_partitions, alpha, seed, min_partition_size):
        if num_partitions == 1:
            return [np.arange(len(labels))]
        key = _key(labels, num_partitions, alpha, seed, min_partition_size)
        try:
            import flwr_datasets  # noqa: F401
        except ImportError:
            if key not in table:
                raise SystemExit(f"device_run: no recorded partition for {key}; run "
                                 "`python bench/device_run.py record ...` on the dev machine")
            return [np.asarray(p, dtype=np.int64) for p in table[key]]
        parts = real(labels, num_partitions, alpha, seed, min_partition_size)
        if key in table:  # dev machine: the recorded table must equal the real function
            assert all(np.array_equal(p, q) for p, q in zip(parts, table[key])), key
        return parts

    partition.dirichlet_partition = replay


def main(argv: list[str]) -> int:
    if argv[:1] == ["record"]:
        dataset, n, alpha, seed = argv[1], int(argv[2]), float(argv[3]), int(argv[4])
        record(dataset, n, alpha, seed)
        return 0
    if argv[:1] == ["cli"]:
        install_replay()
        from fedbicross_flwr.cli import main as cli_main

        return cli_main(argv[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main(sys.argv[1:]))
