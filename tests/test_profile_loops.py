"""bench/profile_loops.py: the operator shares it reports are a partition of the profiled time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "profile_loops.py"


def _script():
    spec = importlib.util.spec_from_file_location("profile_loops", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_operator_groups() -> None:
    loops = _script()
    assert loops.group_of("aten::mkldnn_convolution") == "convolution (forward and backward)"
    assert loops.group_of("aten::convolution_backward") == "convolution (forward and backward)"
    assert loops.group_of("aten::native_batch_norm_backward") == "batch norm (forward and backward)"
    assert loops.group_of("aten::add_") is None


def test_bilevel_profile_shares_sum_to_100(capsys: pytest.CaptureFixture[str]) -> None:
    shares = _script().main(["bilevel", "--width", "8", "--batch", "8", "--steps", "1",
                             "--threads", "1"])
    assert sum(shares.values()) == pytest.approx(100.0, abs=1e-6)
    assert shares["convolution (forward and backward)"] > 20.0  # a ResNet-18 step
    assert "per trajectory step" in capsys.readouterr().out


def test_bad_argument_is_one_line() -> None:
    with pytest.raises(SystemExit):
        _script().main(["bilevel", "--steps", "0"])
