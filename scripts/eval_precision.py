"""Would bf16 evaluation change the paper's metric? fp32 vs bf16 official-test predictions of
trained cached clients: accuracy, argmax flips and time (a tool for the grid's cost question).

    OMP_NUM_THREADS=1 python scripts/eval_precision.py --preset conf/cpu.toml \
        --client-cache outputs/.client-cache --run-config "dataset='digits' seed=0"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cached_clients import load_cached_clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, required=True)
    parser.add_argument("--client-cache", type=Path, required=True)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    clients = load_cached_clients(args.preset, args.client_cache, args.run_config)
    x, y = clients.x_test, clients.y_test
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for pid in sorted(clients.replies):
        model = clients.model(pid).eval()
        with torch.no_grad():
            start = time.perf_counter()
            p32 = torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)]).argmax(1)
            t32 = time.perf_counter() - start
            model = model.to(memory_format=torch.channels_last)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                p16 = torch.cat([model(x_cl[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1)
            t16 = time.perf_counter() - start
        acc32 = 100.0 * (p32 == y).float().mean().item()
        acc16 = 100.0 * (p16 == y).float().mean().item()
        flips = int((p32 != p16).sum())
        print(f"client {pid}: fp32 {acc32:.2f} % ({t32:.1f} s), bf16 channels-last {acc16:.2f} % "
              f"({t16:.1f} s); {flips} of {len(y)} predictions differ", flush=True)


if __name__ == "__main__":
    main()
