"""Frozen teacher soft labels: eager (BN folded) vs torch.compile vs compile with inductor freezing.

    OMP_NUM_THREADS=2 .venv/bin/python bench/teacher_freezing.py

512 images, bf16 channels-last, one ResNet-18 with BN folded; prints the best of 3 after the
first (compiling) call and the largest logit difference to eager. Quoted in docs/BENCHMARKS.md.
"""
import time, torch

from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.fedbicross.utils import batchnorm_folded
import torch._inductor.config as ic
torch.manual_seed(0)
m = build_resnet18(1, 10).eval()
# give BN non-trivial stats
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
f = batchnorm_folded(m).to(memory_format=torch.channels_last)
x = torch.randn(512, 1, 28, 28).contiguous(memory_format=torch.channels_last)
def run(net):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x).float()
def bench(net, name, reps=3):
    out = run(net)
    ts = []
    for _ in range(reps):
        s = time.perf_counter(); run(net); ts.append(time.perf_counter() - s)
    print(f"{name}: best {min(ts):.3f}s", flush=True); return out
ref = bench(f, "eager folded")
s = time.perf_counter(); c = torch.compile(f); o = run(c); print(f"compile default first call {time.perf_counter()-s:.0f}s", flush=True)
o = bench(c, "compiled default"); print("maxdiff", (o - ref).abs().max().item())
ic.freezing = True
torch._dynamo.reset()
s = time.perf_counter(); c2 = torch.compile(f); o = run(c2); print(f"compile freezing first call {time.perf_counter()-s:.0f}s", flush=True)
o = bench(c2, "compiled freezing"); print("maxdiff", (o - ref).abs().max().item())
