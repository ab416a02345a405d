"""One ResNet-18 forward + image-gradient backward, B=64: fp32/bf16 x NCHW/channels-last.

    OMP_NUM_THREADS=2 .venv/bin/python bench/layout_precision.py

Best of 3 per variant (seconds). Quoted in docs/BENCHMARKS.md.
"""
import copy
import time

import torch

from fedbicross_flwr.model import build_resnet18

torch.manual_seed(0)
m = build_resnet18(1, 10).eval().requires_grad_(False)
x0 = torch.randn(64, 1, 28, 28)


def run(model, x, bf16, reps=3):
    ts = []
    for _ in range(reps):
        xx = x.clone().requires_grad_(True)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xx)
        out.float().logsumexp(1).sum().backward(inputs=[xx])
        ts.append(time.perf_counter() - t)
    return min(ts)


print("fp32", run(m, x0, False))
print("bf16", run(m, x0, True))
mc = copy.deepcopy(m).to(memory_format=torch.channels_last)
print("fp32 CL", run(mc, x0.to(memory_format=torch.channels_last), False))
print("bf16 CL", run(mc, x0.to(memory_format=torch.channels_last), True))
