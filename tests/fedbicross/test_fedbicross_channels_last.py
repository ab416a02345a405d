"""Channels-last storage is skipped where torch's CPU kernel corrupts memory (narrow ResNets).

torch 2.14.1's CPU weight gradient of a channels-last 1x1 stride-2 convolution with fewer than
16 input channels corrupts the heap at odd batch sizes (the bi-level validation split of B=256
is 51 images). The crash kills the process, so each case runs in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedbicross_flwr.distill.utils import channels_last_is_safe, to_channels_last
from fedbicross_flwr.model import build_resnet18, is_channels_last

# One bi-level step of a width-8 student through the package's own path, with 51 validation
# images (odd); exits 0 when it finished.
STEP = """
import torch
from fedbicross_flwr.fedbicross.bilevel import inner_step_and_hypergradient
from fedbicross_flwr.distill.utils import to_channels_last
from fedbicross_flwr.model import build_resnet18
torch.manual_seed(0)
model = build_resnet18(1, 3, {width})
to_channels_last([model])
probs = lambda n: torch.softmax(torch.randn(n, 3), 1)
src = [torch.randn(51, 1, 28, 28) for _ in range(2)]
val = torch.randn(51, 1, 28, 28)
for _ in range(3):
    inner_step_and_hypergradient(model, torch.tensor([0.5, 0.5], dtype=torch.float64), src,
                                 [probs(51), probs(51)], [probs(51), probs(51)], val, probs(51),
                                 probs(51), 0.5, 20.0, 0.01, 0.0, 0.0, None)
"""


def _run(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode


def test_narrow_resnets_stay_nchw_and_wide_ones_convert() -> None:
    narrow, wide = build_resnet18(1, 3, 8), build_resnet18(1, 3, 16)
    assert not channels_last_is_safe(narrow) and channels_last_is_safe(wide)
    to_channels_last([narrow, wide])
    assert not is_channels_last(narrow) and is_channels_last(wide)


@pytest.mark.parametrize("width", [8, 16])
def test_a_bilevel_step_at_an_odd_batch_finishes(width: int) -> None:
    assert _run(STEP.format(width=width)) == 0
