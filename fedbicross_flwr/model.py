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
from torchvision.models.resnet import BasicBlock, ResNet

from fedbicross_flwr.keys.sections import SharedConfig

PAPER_WIDTH = 64  # base channel count of ResNet-18 (paper); run-config key `model-width`


class _CifarResNet18(ResNet):
    """torchvision's ResNet-18 with stage widths w, 2w, 4w, 8w (two BasicBlocks each).

    torchvision hard-codes the stage widths 64, 128, 256, 512; :meth:`_make_layer` scales them
    by ``width / 64``. The stem and the classifier that torchvision builds at width 64 are
    replaced (see :func:`build_resnet18`), so at ``width = 64`` the random stream, hence every
    initial weight, is exactly that of ``torchvision.models.resnet18`` with its stem replaced.
    """

    def __init__(self, width: int, num_classes: int) -> None:
        self._width = width
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        if planes == PAPER_WIDTH:  # the first stage: its input is the stem's w channels
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // PAPER_WIDTH, blocks, stride,
                                   dilate)


def build_resnet18(in_channels: int, num_classes: int, width: int = PAPER_WIDTH) -> nn.Module:
    """Return a CIFAR-style ResNet-18 of base width ``width``.

    Parameters
    ----------
    in_channels : int
        1 for grey-scale datasets (e.g. BreastMNIST), 3 for RGB (e.g. RetinaMNIST).
    num_classes : int
        Size of the output layer.
    width : int
        Base channel count w: the stem and stage 1 have w channels, stages 2-4 have 2w, 4w and
        8w (paper and default: 64). Forward FLOPs grow about with w^2 (see :func:`forward_flops`).

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
    if width < 1:
        raise ValueError(f"model width must be a positive integer, got {width}")
    model = _CifarResNet18(width, num_classes)
    model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if width != PAPER_WIDTH:  # torchvision built these at width 64 (a BN draws no random number)
        model.bn1 = nn.BatchNorm2d(width)
        model.fc = nn.Linear(8 * width, num_classes)
    return model


def initial_state(cfg: SharedConfig, in_channels: int, num_classes: int) -> dict[str, torch.Tensor]:
    """The common initial model w^(0) the server sends with ``train`` (seeded by ``seed``).

    As in FedAvg, every client starts from the same initialisation; one-shot parameter
    averaging of independently initialised networks would be meaningless.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_resnet18(in_channels, num_classes, cfg.model_width).state_dict()


def resnet18_shape(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """``(in_channels, num_classes, width)`` of a :func:`build_resnet18` state dict."""
    stem = state["conv1.weight"]  # (w, in_channels, 3, 3)
    return int(stem.shape[1]), int(state["fc.weight"].shape[0]), int(stem.shape[0])


def load_resnet18(state: dict[str, torch.Tensor]) -> nn.Module:
    """A :func:`build_resnet18` model holding ``state``; its shape is read from the state."""
    model = build_resnet18(*resnet18_shape(state))
    model.load_state_dict(state)
    return model


def forward_flops(in_channels: int, num_classes: int, width: int = PAPER_WIDTH,
                  image_size: int = 28) -> int:
    """FLOPs of one image's forward pass (2 per multiply-add, convolutions and the classifier).

    The formula of the architecture, written out: the stem (3x3, ``in_channels`` -> w at full
    resolution), per stage s = 1..4 of c_s = 2^(s-1) w channels two BasicBlocks of two 3x3
    convolutions each (the first of stages 2-4 at stride 2 from c_(s-1) channels, with a 1x1
    stride-2 shortcut), and the 8w -> C classifier. BatchNorm, ReLU and pooling are not
    counted (as ``torch.utils.flop_counter`` does not). Every term but the stem's is
    proportional to w^2.
    """
    side, flops = image_size, 2 * image_size * image_size * in_channels * width * 9
    c_in = width
    for stage in range(4):
        c = width << stage
        if stage:
            side = (side + 1) // 2  # 3x3 stride 2, padding 1 (28 -> 14 -> 7 -> 4)
            flops += 2 * side * side * c_in * c  # the 1x1 stride-2 shortcut
        area = side * side
        flops += 2 * area * 9 * (c_in * c + 3 * c * c)  # four 3x3 convolutions
        c_in = c
    return flops + 2 * 8 * width * num_classes


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D parameters are stored channels-last (NHWC) rather than NCHW."""
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and not p.is_contiguous() for p in model.parameters())


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
        out[key] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)  # type: ignore[union-attr]
    return out


def float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point entries of a state dict: weights and BatchNorm running statistics.

    What a round of Flower's strategies carries: BatchNorm's integer ``num_batches_tracked``
    counters, which BatchNorm with a fixed momentum never reads, are left out, because the
    strategies compute on every array they are given (Krum's distances, the DP clipping
    norms, q-FedAvg's gradients), where a count of steps would outweigh the weights.
    """
    return {k: v for k, v in state.items() if v.is_floating_point()}


def with_counters(state: dict[str, torch.Tensor],
                  reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` completed with ``reference``'s integer buffers it lacks, in ``reference``'s
    key order (the inverse of :func:`float_state`); a missing floating-point entry is not
    filled in.
    """
    out = {k: state.get(k, ref) for k, ref in reference.items()
           if k in state or not ref.is_floating_point()}
    return out | {k: v for k, v in state.items() if k not in reference}


PROBE_SEED = 20240611  # fixed: every check of every run forwards the same probe batch
PROBE_BATCH = 8
MAX_ABS_PROBE_LOGIT = 1e6  # a wide margin; not measured on models trained at paper scale


@torch.no_grad()
def probe_problem(state: dict[str, torch.Tensor], in_channels: int, num_classes: int,
                  image_size: int = 28, width: int = PAPER_WIDTH) -> str | None:
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
    width : int
        The run's ``model-width``.
    """
    model = build_resnet18(in_channels, num_classes, width)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        return f"the model cannot be loaded into ResNet-18: {err}"
    return forward_problem(model, in_channels, image_size)


@torch.no_grad()
def forward_problem(model: nn.Module, in_channels: int, image_size: int = 28) -> str | None:
    """Why ``model``'s eval-mode forward pass on the fixed probe batch is unusable, or None
    (see :func:`probe_problem`; any image classifier, in its parameters' dtype). The model is
    left in eval mode.
    """
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probe = torch.randn(PROBE_BATCH, in_channels, image_size, image_size, generator=generator)
    logits = model.eval()(probe.to(dtype)).float()
    if not bool(torch.isfinite(logits).all()):
        return "its forward pass on the fixed probe batch gives NaN or Inf outputs"
    largest = float(logits.abs().max())
    if largest > MAX_ABS_PROBE_LOGIT:
        return (f"its forward pass on the fixed probe batch gives logits of absolute value "
                f"{largest:.3g}, above the bound {MAX_ABS_PROBE_LOGIT:g}")
    return None


def probe_for(reference: dict[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], str | None]:
    """:func:`probe_problem` for models shaped like ``reference`` (a ResNet-18 state dict)."""
    in_channels, num_classes, width = resnet18_shape(reference)
    return partial(probe_problem, in_channels=in_channels, num_classes=num_classes, width=width)
