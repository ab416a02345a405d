"""Phase-3 evaluation cost: fp32 vs bf16 channels-last accuracy forwards, and the shared-split memo.

    .venv/bin/python bench/client_eval.py [--threads 2] [--dataset digits]

One seeded ResNet-18 (no training needed: the cost does not depend on the weights), the
dataset's official test split. Prints seconds per pass for ``eval-precision`` fp32 and bf16
(best of 3, after one warm-up), how many argmax predictions differ between the two, and the
time of a phase-3 style "before" evaluation by 5 clients that received the same model, with
and without the fingerprint memo of ``fedbicross_flwr.client``. Quoted in docs/BENCHMARKS.md.
"""
import argparse
import time

import torch

from fedbicross_flwr import client
from fedbicross_flwr.data import load_dataset
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.site import to_tensors
from fedbicross_flwr.training import accuracy, predict_logits


def best_of(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.data_dir)
    x, y = to_tensors(ds.test.images, ds.test.labels)  # (n, C, 28, 28), (n,)
    torch.manual_seed(0)
    model = build_resnet18(ds.in_channels, ds.num_classes).eval()
    cpu = torch.device("cpu")
    print(f"{args.dataset}: {len(y)} official test images, {torch.get_num_threads()} threads")
    t32 = best_of(lambda: predict_logits(model, x, cpu))
    t16 = best_of(lambda: predict_logits(model, x, cpu, precision="bf16"))
    flips = int((predict_logits(model, x, cpu).argmax(1)
                 != predict_logits(model, x, cpu, precision="bf16").argmax(1)).sum())
    print(f"one pass: fp32 {t32:.2f} s, bf16 channels-last {t16:.2f} s ({t32 / t16:.2f}x); "
          f"{flips} of {len(y)} predictions differ")
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        for _ in range(5):
            accuracy(model, x, y, cpu, precision)
        plain = time.perf_counter() - start
        client._SHARED_EVAL.clear()
        start = time.perf_counter()
        for _ in range(5):
            client.shared_split_accuracy(model, x, y, cpu, precision)
        memo = time.perf_counter() - start
        print(f"5 clients, same received model, {precision}: {plain:.2f} s without the memo, "
              f"{memo:.2f} s with it ({plain / memo:.2f}x)")


if __name__ == "__main__":
    main()
