"""One synthesis step (forward + image gradient with the R_BN hook) of one ResNet-18 member,
B=64, bf16: eager vs torch.compile, and both against float32.

    OMP_NUM_THREADS=1 .venv/bin/python bench/compile_synthesis.py

Prints seconds per step (mean of 3 after warm-up), the first compiled call (compile time), and
the relative difference of the image gradients. Quoted in docs/BENCHMARKS.md.
"""
import time

import torch
import torch.nn.functional as F

from fedbicross_flwr.fedbicross.losses import BNStatsHook
from fedbicross_flwr.model import build_resnet18

torch.manual_seed(0)
model = build_resnet18(1, 10).train()
with torch.no_grad():
    for _ in range(2):
        model(torch.randn(64, 1, 28, 28))
model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_(True)
y = torch.randint(0, 10, (64,))


def image_gradient(net, bf16=True):
    x.grad = None
    with BNStatsHook([model]) as hook:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            log_p = net(x).float().log_softmax(1)
        loss = F.nll_loss(log_p, y) + 0.01 * hook.loss()
    loss.backward(inputs=[x])
    return x.grad.clone()


def per_step(net, reps=3):
    start = time.perf_counter()
    for _ in range(reps):
        image_gradient(net)
    return (time.perf_counter() - start) / reps


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


g_eager = image_gradient(model)
print(f"eager bf16: {per_step(model):.2f} s per step", flush=True)
compiled = torch.compile(model)
start = time.perf_counter()
g_compiled = image_gradient(compiled)
print(f"first compiled call (compile): {time.perf_counter() - start:.0f} s", flush=True)
print(f"compiled bf16: {per_step(compiled):.2f} s per step", flush=True)
g_fp32 = image_gradient(model, bf16=False)
print(f"image gradient vs float32: eager bf16 {rel(g_eager, g_fp32):.3f}, "
      f"compiled bf16 {rel(g_compiled, g_fp32):.3f}; compiled vs eager {rel(g_compiled, g_eager):.3f}")
