"""R_BN statistics of one activation with their backward: var_mean over (0, 2, 3) vs channel_moments.

    OMP_NUM_THREADS=1 .venv/bin/python bench/channel_moments.py

bf16 channels-last activations (as in bf16 synthesis), float32 statistics; mean of 5 runs
after one warm-up, milliseconds; relative errors of mean, variance and input gradient against
the var_mean form. Quoted in docs/BENCHMARKS.md.
"""
import time

import torch

from fedbicross_flwr.fedbicross.losses import channel_moments

torch.manual_seed(0)


def var_mean_form(a):
    v, m = torch.var_mean(a.float(), dim=(0, 2, 3), unbiased=False)
    return m, v


def timed(moments, a, reps=5):
    def once():
        a.grad = None
        m, v = moments(a)
        (0.3 * m.sum() + 0.7 * v.sum()).backward()
        return m.detach(), v.detach(), a.grad.float().clone()

    once()
    start = time.perf_counter()
    for _ in range(reps):
        out = once()
    return 1e3 * (time.perf_counter() - start) / reps, out


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


for shape in [(64, 64, 28, 28), (64, 128, 14, 14), (64, 512, 4, 4)]:
    a = (torch.randn(shape) * 2 + 0.5).to(torch.bfloat16)
    a = a.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    t_ref, ref = timed(var_mean_form, a)
    t_new, new = timed(channel_moments, a)
    errors = ", ".join(f"{name} {rel(x, y):.1e}" for name, x, y in zip(("mean", "var", "grad"), new, ref))
    print(f"{shape}: var_mean {t_ref:.1f} ms, channel_moments {t_new:.1f} ms; rel. err. {errors}")
