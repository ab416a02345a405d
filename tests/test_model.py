"""CIFAR-style ResNet-18 for 28x28 inputs."""

from __future__ import annotations

import pytest
import torch

from fedbicross_flwr.model import build_resnet18


@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 5), (1, 10)])
def test_output_shape(channels: int, classes: int) -> None:
    model = build_resnet18(channels, classes).eval()
    with torch.no_grad():
        out = model(torch.randn(4, channels, 28, 28))
    assert out.shape == (4, classes)


def test_stem_keeps_resolution() -> None:
    model = build_resnet18(3, 5)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    feats = {}

    def keep_shape(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        feats["l4"] = output.shape

    model.layer4.register_forward_hook(keep_shape)
    model.eval()(torch.randn(1, 3, 28, 28))
    assert feats["l4"][-2:] == (4, 4)  # 28 -> 28 -> 14 -> 7 -> 4


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_resnet18(2, 5)
    with pytest.raises(ValueError):
        build_resnet18(3, 1)


def test_width_64_is_torchvision_resnet18_with_the_cifar_stem() -> None:
    """At the paper's width every initial weight is torchvision's (same random stream)."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    reference = resnet18(weights=None, num_classes=5)
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    torch.manual_seed(0)
    ours = build_resnet18(3, 5)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def _parameter_formula(in_channels: int, num_classes: int, w: int) -> int:
    """Trainable parameters of the CIFAR ResNet-18, written out from the architecture."""
    total = 9 * in_channels * w + 2 * w  # stem conv + its BN
    c_in = w
    for stage in range(4):
        c = w << stage
        total += 9 * c_in * c + 9 * c * c + 2 * (9 * c * c) + 4 * 2 * c  # 4 convs, 4 BNs
        if stage:
            total += c_in * c + 2 * c  # 1x1 stride-2 shortcut + its BN
        c_in = c
    return total + 8 * w * num_classes + num_classes  # fc


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_parameters_and_flops_follow_the_formula(width: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from fedbicross_flwr.model import forward_flops, resnet18_shape

    model = build_resnet18(1, 10, width).eval()
    assert sum(p.numel() for p in model.parameters()) == _parameter_formula(1, 10, width)
    assert resnet18_shape(model.state_dict()) == (1, 10, width)
    stage_channels = [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
                      model.layer3[0].conv1.out_channels, model.layer4[0].conv1.out_channels]
    assert stage_channels == [width, 2 * width, 4 * width, 8 * width]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(3, 1, 28, 28))
    assert counter.get_total_flops() == 3 * forward_flops(1, 10, width)


def test_flops_grow_with_the_square_of_the_width() -> None:
    from fedbicross_flwr.model import forward_flops

    ratio = forward_flops(3, 5, 64) / forward_flops(3, 5, 16)
    assert 15.5 < ratio < 16.0  # only the stem (in_channels -> w) grows linearly


def test_upload_of_another_width_is_refused_by_name() -> None:
    from fedbicross_flwr.protocol import validate_upload

    reason = validate_upload(build_resnet18(1, 3, 32).state_dict(),
                             build_resnet18(1, 3, 16).state_dict())
    assert reason is not None and "model width" in reason and "32" in reason and "16" in reason
    assert validate_upload(build_resnet18(1, 3, 16).state_dict(),
                           build_resnet18(1, 3, 16).state_dict()) is None
