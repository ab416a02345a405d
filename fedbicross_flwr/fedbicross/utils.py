"""Small helpers shared by the FedBiCross server modules (seeding, autocast, train/eval modes)."""

from __future__ import annotations

import contextlib
import copy
from logging import WARNING
from typing import Iterator, Sequence

import torch
from torch import nn

from ..logging_utils import log
from ..model import is_channels_last
from ..training import autocast, autocast_off  # noqa: F401 - re-exported for the server stages


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


# ``torch.autocast`` in bfloat16 when the precision is 'bf16', else a no-op: the client's helper.
autocast_context = autocast


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


def batchnorm_folded(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy with every BatchNorm folded into the convolution before it.

    In eval mode BN is the affine map gamma * (z - mu) / sqrt(var + eps) + beta of its input,
    so conv -> BN equals one convolution with rescaled weights and a bias. Folding removes the
    BN passes over the activations (about 10 % of a bf16 ResNet-18 forward on CPU) and is
    exact up to float rounding. Only for predictions of frozen teachers: the copy has no BN
    statistics to hook, adapt or train. Uses ``torch.fx.experimental.optimization.fuse``; a
    model that torch.fx cannot trace is returned as an unfolded frozen copy.

    Parameters
    ----------
    model : nn.Module
        Any model; it is not modified.

    Returns
    -------
    nn.Module
        Eval-mode copy, ``requires_grad`` False, channels-last where the model was.
    """
    from torch.fx.experimental.optimization import fuse

    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    channels_last = is_channels_last(frozen)
    try:
        folded = fuse(frozen, inplace=True)
    except Exception as error:  # noqa: BLE001 - an untraceable model still predicts correctly
        log(WARNING, "BN folding skipped (%s: %s); predicting with the unfolded model",
            type(error).__name__, error)
        return frozen
    folded.eval().requires_grad_(False)
    if channels_last:
        folded.to(memory_format=torch.channels_last)
    return folded
