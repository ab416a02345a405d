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


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Upcast autocast (bf16/fp16) outputs to float32; float32/float64 and others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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


def compiled(module: nn.Module, on: bool) -> nn.Module:
    """``torch.compile(module)`` (inductor, static shapes) when ``on``, else ``module`` itself.

    The wrapper shares the module's parameters, buffers and submodules (hooks registered on
    them fire, ``eval()``/``train()`` reach them). Parameters and buffers are graph inputs,
    so modules of one architecture share one compiled graph per input shape: the compile is
    paid once per process, not per model or per noise-adapted copy. Shapes are static (a
    second shape is a second graph, not a dynamic one).
    """
    if not on:
        return module
    return torch.compile(module, dynamic=False)  # type: ignore[return-value]


# torch 2.14.1 on CPU: the weight gradient of a channels-last 1x1 stride-2 convolution with
# fewer than 16 input channels corrupts the heap (segmentation fault, "double free") when the
# batch size is odd, in float32 and bfloat16 alike (ResNet-18's stage-2 shortcut has w input
# channels, so model-width 8 with the bi-level validation split of 51 images crashes). The
# gradients are exact at even batch sizes and from 16 channels on.
_MIN_CHANNELS_LAST_SHORTCUT = 16


def channels_last_is_safe(model: nn.Module) -> bool:
    """Whether :func:`to_channels_last` may convert ``model`` (see the note above)."""
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   and m.in_channels < _MIN_CHANNELS_LAST_SHORTCUT for m in model.modules())


def to_channels_last(models: Sequence[nn.Module]) -> None:
    """Store every 4-D parameter and buffer channels-last (NHWC), in place; values unchanged.

    oneDNN (CPU) and cuDNN (GPU) pick their fast convolution kernels when the weights are
    channels-last; the convolution output then follows that layout. Idempotent. Models that
    :func:`channels_last_is_safe` refuses (ResNet-18 below width 16) stay NCHW on the CPU.
    """
    for model in models:
        device = next(iter(model.parameters()), torch.empty(0)).device
        if device.type == "cpu" and not channels_last_is_safe(model):
            continue
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
