"""Eval-mode ResNet-18 forward of 256 bf16 images: as is, BN folded, torch.compile (freezing).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bn_fold.py [--compile]

Best of 3 per variant (seconds), the largest output difference against the unfolded model,
and the one-off cost of batchnorm_folded. Quoted in docs/BENCHMARKS.md.
"""
import copy
import sys
import time

import torch

from fedbicross_flwr.fedbicross.utils import batchnorm_folded
from fedbicross_flwr.model import build_resnet18

torch.manual_seed(0)
base = build_resnet18(1, 10)
with torch.no_grad():  # non-trivial running statistics
    base.train()
    for _ in range(3):
        base(torch.randn(64, 1, 28, 28))
base.eval().requires_grad_(False)
x = torch.randn(256, 1, 28, 28).contiguous(memory_format=torch.channels_last)


def best(model, name, reps=3):
    model = model.to(memory_format=torch.channels_last)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        times.append(time.perf_counter() - start)
    print(f"{name}: best {min(times):.2f} s", flush=True)
    return y.float()


y_plain = best(copy.deepcopy(base), "eager bf16")
start = time.perf_counter()
folded = batchnorm_folded(base)
print(f"batchnorm_folded: {1e3 * (time.perf_counter() - start):.0f} ms once")
y_folded = best(folded, "BN folded bf16")
print(f"max |difference| {(y_plain - y_folded).abs().max().item():.4f} "
      f"(logits up to {y_plain.abs().max().item():.2f})")
if "--compile" in sys.argv:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(copy.deepcopy(base).to(memory_format=torch.channels_last))
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x)
    print(f"compile: {time.perf_counter() - start:.0f} s", flush=True)
    best(compiled, "torch.compile (inductor, freezing) bf16")
