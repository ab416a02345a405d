"""bf16 autocast warns once where the CPU only emulates bfloat16."""

import logging
from pathlib import Path

import pytest
import torch

from fedbicross_flwr import training


def _emulated_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum("emulated" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


@pytest.mark.parametrize("native, expected", [(False, 1), (True, 0)])
def test_bf16_on_an_emulating_cpu_warns_once(monkeypatch, caplog, native, expected):
    # Prepare
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(training, "_warned_emulated_bf16", False)
    caplog.set_level(logging.WARNING)
    # Execute: two bf16 regions and one fp32 region
    for precision in ("bf16", "bf16", "fp32"):
        with training.autocast("cpu", precision):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
    # Assert: the regions still autocast as asked; one warning at most, only when emulated
    assert out.dtype == torch.float32
    with training.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert _emulated_warnings(caplog) == expected


def test_the_detection_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the flags from")
    flags = set(cpuinfo.read_text().split())
    assert training.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


@pytest.mark.parametrize("native", [False, True])
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bfloat16(monkeypatch, caplog, native):
    # Prepare
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(training, "_warned_emulated_bf16", False)
    caplog.set_level(logging.WARNING)
    # Execute
    with training.autocast("cpu", "auto"):
        dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    # Assert: bf16 only on a native CPU, and 'auto' never warns; fp32 and bf16 are as asked
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert training.uses_bf16("cpu", "auto") is native
    assert (training.uses_bf16("cpu", "fp32"), training.uses_bf16("cpu", "bf16")) == (False, True)
    assert _emulated_warnings(caplog) == 0
