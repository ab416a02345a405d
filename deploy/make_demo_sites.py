"""Demo site archives for a loopback walk-through: one MedMNIST-format npz per hospital.

Splits a dataset the project can load (default: scikit-learn's ``digits``, built offline; or an
official MedMNIST flag) into ``--sites`` label-skewed sites with the project's Dirichlet
partition, and writes ``OUT_DIR/site<i>.npz`` with ``train_*`` (the site's partition),
``val_*`` (its local validation share) and ``test_*`` (its share of the official test split,
following its own label distribution). Real hospitals bring their own archives instead.

Usage: python deploy/make_demo_sites.py OUT_DIR [--sites 3] [--dataset digits] [--alpha 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedbicross_flwr.data.datasets import ArraySplit, DatasetArrays, load_dataset, write_npz
from fedbicross_flwr.data.partition import make_client_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ds = load_dataset(args.dataset)
    splits = make_client_splits(ds.train.labels, ds.test.labels, ds.num_classes, args.sites,
                                args.alpha, args.seed, 0.1, 10)
    for i, s in enumerate(splits):
        def pick(split: ArraySplit, idx) -> ArraySplit:
            return ArraySplit(split.images[idx], split.labels[idx])

        site = DatasetArrays(f"site{i}", ds.in_channels, ds.num_classes,
                             pick(ds.train, s.train_idx), pick(ds.train, s.val_idx),
                             pick(ds.test, s.personal_test_idx))
        path = write_npz(site, args.out_dir.resolve() / f"site{i}.npz")
        print(f"{path}: {len(site.train)} train, {len(site.val)} val, {len(site.test)} test "
              f"images ({ds.in_channels} channel(s), {ds.num_classes} classes)")


if __name__ == "__main__":
    main()
