"""The three passes of a 3x3 convolution on this CPU: forward, input gradient, weight gradient.

    .venv/bin/python bench/conv_passes.py          # bf16 channels-last, B=64 and B=51

Each ResNet-18 layer shape (28x28 input, CIFAR stem) at B=64 (synthesis) and B=51 (a bi-level
source batch), best of 10 after two warm-up calls: the forward, the input gradient
(``convolution_backward`` with output_mask [True, False, False]), the same input gradient as a
forward convolution with flipped, transposed weights (stride 1 only), and the weight gradient.
Quoted in docs/BENCHMARKS.md (sixth session).
"""
import torch
import torch.nn.functional as F

from _timing import best_ms  # bench/ is the script's folder, first on sys.path

torch.manual_seed(0)
CL = torch.channels_last
SHAPES = [(64, 64, 28, 1), (64, 128, 28, 2), (128, 128, 14, 1), (128, 256, 14, 2),
          (256, 256, 7, 1), (256, 512, 7, 2), (512, 512, 4, 1)]  # (C_in, C_out, H, stride)


for batch in (64, 51):
    for c_in, c_out, size, stride in SHAPES:
        x = torch.randn(batch, c_in, size, size).bfloat16().contiguous(memory_format=CL)
        w = torch.randn(c_out, c_in, 3, 3).bfloat16().contiguous(memory_format=CL)
        out = (size + 2 - 3) // stride + 1
        g = torch.randn(batch, c_out, out, out).bfloat16().contiguous(memory_format=CL)
        args = ([stride] * 2, [1, 1], [1, 1], False, [0, 0], 1)
        gflop = 2 * batch * out * out * c_out * c_in * 9 / 1e9
        fwd = best_ms(lambda: F.conv2d(x, w, padding=1, stride=stride))
        data = best_ms(lambda: torch.ops.aten.convolution_backward(g, x, w, None, *args,
                                                                   [True, False, False]))
        weight = best_ms(lambda: torch.ops.aten.convolution_backward(g, x, w, None, *args,
                                                                     [False, True, False]))
        line = (f"B={batch} {c_in:3d}->{c_out:3d} {size:2d}x{size:<2d} s{stride}: "
                f"{gflop:.2f} GFLOP; forward {fwd:5.1f} ms ({gflop / fwd * 1e3:3.0f} GFLOP/s), "
                f"input grad {data:5.1f} ms, weight grad {weight:5.1f} ms "
                f"({gflop / weight * 1e3:3.0f} GFLOP/s)")
        if stride == 1:
            w_t = w.flip(2, 3).transpose(0, 1).contiguous(memory_format=CL)
            as_fwd = best_ms(lambda: F.conv2d(g, w_t, padding=1))
            line += f", input grad as a forward {as_fwd:5.1f} ms"
        print(line, flush=True)
