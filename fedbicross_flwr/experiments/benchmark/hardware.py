"""Device facts for the benchmark: timing sync, peak memory, FLOP counting, peak FLOP/s, TF32."""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from ...training import uses_bf16

# Dense (no sparsity) peak TFLOP/s of known GPUs: (bf16, fp32), SXM variants.
_GPU_PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5),
              "L40S": (362.0, 91.6), "A10": (125.0, 31.2)}


_T = TypeVar("_T")

def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA is asynchronous); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], _T], device: torch.device) -> tuple[_T, float]:
    """Run ``fn`` and return (its result, wall seconds), synchronising the device around it."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def count_flops(fn: Callable[[], _T]) -> tuple[_T, int]:
    """Run ``fn`` under torch's FLOP counter (matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def reset_peak_memory(device: torch.device) -> None:
    """Reset the peak-memory counter of a CUDA device (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what it measures): CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_mhz() -> float:
    try:
        values = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("cpu MHz")]
        return max(values) if values else 0.0
    except (OSError, ValueError):
        return 0.0


def estimate_peak_flops(device: torch.device, bf16: bool) -> tuple[float | None, str]:
    """Rough peak FLOP/s of the device for the compute dtype, and how it was estimated.

    CPU: threads x clock x FLOP per cycle, assuming two 256-bit FMA pipes (32 float32
    FLOP/cycle with AVX-512 as on AMD Zen 4, 16 with AVX2) and twice that for bf16 when the
    CPU has ``avx512_bf16``. GPU: a table of dense datasheet peaks. None if unknown: pass the
    peak explicitly.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak_bf16, peak_fp32) in _GPU_PEAKS.items():
            if key in name:
                return (peak_bf16 if bf16 else peak_fp32) * 1e12, f"datasheet dense peak of {name}"
        return None, f"unknown GPU {name}"
    flags = _cpu_flags()
    mhz = _cpu_mhz()
    if not mhz:
        return None, "CPU clock unknown"
    per_cycle = 32 if "avx512f" in flags else 16
    if bf16 and "avx512_bf16" in flags:
        per_cycle *= 2
    threads = torch.get_num_threads()
    how = (f"{threads} threads x {mhz:.0f} MHz x {per_cycle} FLOP/cycle "
           f"({'bf16 dot products' if per_cycle > 32 else 'FMA'}; rough)")
    return threads * mhz * 1e6 * per_cycle, how


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """float32 convolutions and matmuls in true float32 on CUDA (no TF32) inside the block.

    PyTorch lets cuDNN run float32 convolutions in TF32 on Ampere and later GPUs (10-bit
    mantissa), which is not float32 arithmetic: equality checks and the float32 peak are
    measured without it. The previous settings are restored on exit; a no-op without CUDA.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def has_native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 in hardware (a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX); bf16 elsewhere is emulated and its rate says nothing about the chip.
    """
    return uses_bf16(device, "auto")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (its flags say the rest)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
