"""Measured peak FLOP/s of a device: one large GEMM and one large convolution, each timed alone.

The server stage's rates are compared with what the same device reaches on the two operations
its work is made of, at sizes large enough to keep every core or SM busy: a square matrix
product and a 3x3 convolution (channels-last, as the stages run it). float32 is measured with
TF32 off (true float32 arithmetic); bf16 where the device computes it natively
(:func:`~.hardware.has_native_bf16`). The peak of a dtype is the faster of the two operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .hardware import has_native_bf16, tf32_disabled, timed

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PeakSizes:
    """Operand sizes of the peak measurement, and how long to repeat each operation.

    Attributes
    ----------
    gemm : int
        n of the (n, n) @ (n, n) product (2 n^3 FLOPs).
    conv_batch, conv_channels, conv_size : int
        Batch, input = output channels and height = width of the 3x3 convolution (padding 1:
        2 * batch * channels^2 * 9 * size^2 FLOPs).
    min_seconds : float
        Each operation is repeated until this much time has passed (at least once after a
        warm-up call); the fastest repetition gives the rate.
    """

    gemm: int
    conv_batch: int
    conv_channels: int
    conv_size: int
    min_seconds: float

    def gemm_flops(self) -> int:
        """FLOPs of one matrix product."""
        return 2 * self.gemm ** 3

    def conv_flops(self) -> int:
        """FLOPs of one convolution (multiply and add counted apart, as torch's counter does)."""
        return 2 * self.conv_batch * self.conv_channels ** 2 * 9 * self.conv_size ** 2


# About 1 TFLOP per GEMM and 0.24 TFLOP per convolution on a GPU; tens of GFLOP on a CPU;
# a few MFLOP for the tests.
GPU_SIZES = PeakSizes(gemm=8192, conv_batch=256, conv_channels=256, conv_size=28,
                      min_seconds=1.0)
CPU_SIZES = PeakSizes(gemm=2048, conv_batch=32, conv_channels=128, conv_size=28,
                      min_seconds=1.0)
TINY_SIZES = PeakSizes(gemm=64, conv_batch=2, conv_channels=8, conv_size=8, min_seconds=0.0)


def default_sizes(device: torch.device, tiny: bool) -> PeakSizes:
    """The sizes for ``device`` (tiny ones for tests)."""
    if tiny:
        return TINY_SIZES
    return GPU_SIZES if device.type == "cuda" else CPU_SIZES


def _best_rate(fn: Callable[[], Any], flops: int, device: torch.device,
               min_seconds: float) -> float:
    """FLOP/s of the fastest call of ``fn`` after one warm-up call."""
    fn()
    best, spent = 0.0, 0.0
    while True:
        _, seconds = timed(fn, device)
        spent += seconds
        best = max(best, flops / max(seconds, 1e-12))
        if spent >= min_seconds:
            return best


def _operands(sizes: PeakSizes, device: torch.device, dtype: torch.dtype
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(sizes.gemm, sizes.gemm, generator=gen).to(device, dtype)
            for _ in range(2))
    x = torch.randn(sizes.conv_batch, sizes.conv_channels, sizes.conv_size, sizes.conv_size,
                    generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(sizes.conv_channels, sizes.conv_channels, 3, 3, generator=gen) * 0.05
         ).to(device, dtype).contiguous(memory_format=torch.channels_last)
    return a, b, x, w


@torch.no_grad()
def measure_peak(device: torch.device, sizes: PeakSizes) -> dict[str, dict[str, Any]]:
    """The measured GEMM and convolution rates of ``device`` per dtype.

    Returns
    -------
    dict
        'fp32' and, where the device has native bfloat16, 'bf16': each a dict with
        'gemm_flops_per_s', 'conv_flops_per_s', 'flops_per_s' (the larger) and 'how' (the
        sizes, in words).
    """
    dtypes = ["fp32"] + (["bf16"] if has_native_bf16(device) else [])
    out: dict[str, dict[str, Any]] = {}
    with tf32_disabled():
        for name in dtypes:
            a, b, x, w = _operands(sizes, device, _DTYPES[name])
            gemm = _best_rate(lambda: torch.mm(a, b), sizes.gemm_flops(), device,
                              sizes.min_seconds)
            conv = _best_rate(lambda: F.conv2d(x, w, padding=1), sizes.conv_flops(), device,
                              sizes.min_seconds)
            out[name] = {"gemm_flops_per_s": gemm, "conv_flops_per_s": conv,
                         "flops_per_s": max(gemm, conv),
                         "how": (f"{name} GEMM {sizes.gemm}^2 x {sizes.gemm}^2 and 3x3 "
                                 f"convolution {sizes.conv_batch}x{sizes.conv_channels}x"
                                 f"{sizes.conv_size}^2, channels-last, each timed alone "
                                 f"(fastest call), TF32 off")}
    return out


def peak_for(peaks: dict[str, dict[str, Any]], dtype: str) -> float | None:
    """The measured peak FLOP/s for a run in ``dtype`` (None if that dtype was not measured)."""
    entry = peaks.get(dtype)
    return None if entry is None else float(entry["flops_per_s"])
