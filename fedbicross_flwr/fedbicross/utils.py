"""Small helpers shared by the FedBiCross server modules (seeding, autocast, train/eval modes)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


def derive_seed(seed: int, *parts: int) -> int:
    """Deterministic child seed from a master seed and integer tags (e.g. epoch, cluster).

    Parameters
    ----------
    seed : int
        Master seed.
    *parts : int
        Tags identifying the consumer.

    Returns
    -------
    int
        A seed in [0, 2**63).
    """
    value = seed & 0xFFFFFFFFFFFFFFFF
    for part in parts:
        # SplitMix64-style mixing, so (1, 2) and (2, 1) give unrelated streams.
        value = (value * 0x9E3779B97F4A7C15 + part + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def cpu_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator: draws are made on CPU and moved, so they do not depend on device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def autocast_context(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bfloat16 when ``mixed_precision == 'bf16'``, else a no-op."""
    if mixed_precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def preserved_modes(models: Sequence[nn.Module]) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (callers' models are not mutated)."""
    saved = [[(module, module.training) for module in model.modules()] for model in models]
    try:
        yield
    finally:
        for flags in saved:
            for module, training in flags:
                module.training = training


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's first parameter (float32 unless the caller changed it)."""
    for parameter in model.parameters():
        return parameter.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def frozen_buffers(models: Sequence[nn.Module]) -> Iterator[None]:
    """Restore every buffer (e.g. BN running statistics) on exit.

    Train-mode BN forwards of a frozen teacher (FedISCA's noise-adapted variant) would otherwise
    keep moving its running statistics while it only predicts.
    """
    saved = [[(b, b.detach().clone()) for b in model.buffers()] for model in models]
    try:
        yield
    finally:
        with torch.no_grad():
            for pairs in saved:
                for buffer, value in pairs:
                    buffer.copy_(value)


def to_channels_last(models: Sequence[nn.Module]) -> None:
    """Store every 4-D parameter and buffer channels-last (NHWC), in place; values unchanged.

    oneDNN (CPU) and cuDNN (GPU) pick their fast convolution kernels when the weights are
    channels-last; the convolution output then follows that layout. Idempotent.
    """
    for model in models:
        model.to(memory_format=torch.channels_last)


def to_contiguous(models: Sequence[nn.Module]) -> None:
    """Undo :func:`to_channels_last` (plain NCHW storage, e.g. before state dicts leave)."""
    for model in models:
        model.to(memory_format=torch.contiguous_format)
