"""ResNet-18 in its CIFAR form for 28x28 MedMNIST images (paper Sec. IV-A).

torchvision's ``resnet18`` with the ImageNet stem (7x7 stride-2 conv + max-pool) replaced by a
3x3 stride-1 conv and no pooling, so a 28x28 input keeps its resolution in the first stage:
28 -> 28 -> 14 -> 7 -> 4 (then global average pooling).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision.models import resnet18


def build_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """Return a CIFAR-style ResNet-18.

    Parameters
    ----------
    in_channels : int
        1 for grey-scale datasets (e.g. BreastMNIST), 3 for RGB (e.g. RetinaMNIST).
    num_classes : int
        Size of the output layer.

    Returns
    -------
    torch.nn.Module
        Maps (B, in_channels, 28, 28) images normalised with mean 0.5 / std 0.5 to
        (B, num_classes) logits.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D parameters are stored channels-last (NHWC) rather than NCHW."""
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and not p.is_contiguous() for p in model.parameters())


@torch.no_grad()
def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Parameter-wise weighted mean of state dicts, BatchNorm buffers included.

    Floating-point tensors are averaged in float64 and cast back; integer buffers
    (``num_batches_tracked``) get the weighted mean rounded to the nearest integer.
    """
    if not states:
        raise ValueError("cannot average zero models")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights))
        out[key] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out


PROBE_SEED = 20240611  # fixed: every check of every run forwards the same probe batch
PROBE_BATCH = 8
MAX_ABS_PROBE_LOGIT = 1e6  # a wide margin; not measured on models trained at paper scale


@torch.no_grad()
def probe_problem(state: dict[str, torch.Tensor], in_channels: int, num_classes: int,
                  image_size: int = 28) -> str | None:
    """Why a model's forward pass on a fixed probe batch is unusable, or None.

    The probe is :data:`PROBE_BATCH` images of N(0, 1) noise in the normalised input space,
    seeded by :data:`PROBE_SEED`; the model runs in eval mode (BatchNorm running statistics),
    as the server's methods and the clients use it. Outputs must be finite and below
    :data:`MAX_ABS_PROBE_LOGIT` in absolute value.

    Parameters
    ----------
    state : dict
        A ResNet-18 state dict of the given shape (keys and shapes already checked).
    in_channels, num_classes : int
        The federation's image channels and classes.
    image_size : int
        Side of the probe images.
    """
    model = build_resnet18(in_channels, num_classes)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        return f"the model cannot be loaded into ResNet-18: {err}"
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probe = torch.randn(PROBE_BATCH, in_channels, image_size, image_size, generator=generator)
    logits = model.eval()(probe)
    if not bool(torch.isfinite(logits).all()):
        return "its forward pass on the fixed probe batch gives NaN or Inf outputs"
    largest = float(logits.abs().max())
    if largest > MAX_ABS_PROBE_LOGIT:
        return (f"its forward pass on the fixed probe batch gives logits of absolute value "
                f"{largest:.3g}, above the bound {MAX_ABS_PROBE_LOGIT:g}")
    return None


def probe_for(reference: dict[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], str | None]:
    """:func:`probe_problem` for models shaped like ``reference`` (a ResNet-18 state dict)."""
    in_channels = int(reference["conv1.weight"].shape[1])
    num_classes = int(reference["fc.weight"].shape[0])
    return partial(probe_problem, in_channels=in_channels, num_classes=num_classes)
