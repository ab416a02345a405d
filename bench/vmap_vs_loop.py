"""3 ResNet-18 members on the same B=64 batch, bf16 channels-last, no grad: loop vs vmap.

    OMP_NUM_THREADS=2 .venv/bin/python bench/vmap_vs_loop.py

Two repetitions of each (seconds). Quoted in docs/BENCHMARKS.md.
"""
import copy
import time

import torch
from torch.func import functional_call, stack_module_state

from fedbicross_flwr.model import build_resnet18

torch.manual_seed(0)
ms = [build_resnet18(1, 10).eval().requires_grad_(False).to(memory_format=torch.channels_last)
      for _ in range(3)]
x = torch.randn(64, 1, 28, 28).to(memory_format=torch.channels_last)
params, bufs = stack_module_state(ms)
base = copy.deepcopy(ms[0]).to("meta")


def f(p, b, x):
    return functional_call(base, (p, b), (x,))


for rep in range(2):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t = time.perf_counter()
        a = torch.stack([m(x) for m in ms])
        print("loop", time.perf_counter() - t)
        t = time.perf_counter()
        b = torch.vmap(f, in_dims=(0, 0, None))(params, bufs, x)
        print("vmap", time.perf_counter() - t)
print("max abs difference", (a.float() - b.float()).abs().max().item())
