"""Two one-thread streams vs one two-thread stream for four member forward+image-gradient passes.

    .venv/bin/python bench/cluster_streams.py

Would running the K clusters of FedBiCross side by side (one torch thread each) use 2 cores
better than intra-op parallelism? ResNet-18, B=64, bf16 channels-last; quoted in
docs/BENCHMARKS.md ("Where the time goes, and what was tried").
"""
import time, threading, torch
from concurrent.futures import ThreadPoolExecutor

from fedbicross_flwr.model import build_resnet18
torch.manual_seed(0)
models = [build_resnet18(1, 10).to(memory_format=torch.channels_last).eval().requires_grad_(False) for _ in range(4)]
xs = [torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_(True) for _ in range(4)]
def work(i):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = models[i](xs[i])
    g, = torch.autograd.grad(out.float().logsumexp(1).sum(), xs[i])
    return g
def seq(n):
    torch.set_num_threads(n)
    s = time.perf_counter(); [work(i) for i in range(4)]; return time.perf_counter() - s
def par():
    torch.set_num_threads(1)
    with ThreadPoolExecutor(2) as ex:
        s = time.perf_counter(); list(ex.map(work, range(4))); return time.perf_counter() - s
for rep in range(3):
    print(f"seq 2 threads {seq(2):.2f}s  seq 1 thread {seq(1):.2f}s  2 streams x 1 thread {par():.2f}s", flush=True)
