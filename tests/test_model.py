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
