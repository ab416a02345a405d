"""Client-side evaluation: bf16 channels-last accuracy forwards and the shared-split memo."""

from __future__ import annotations

import pytest
import torch

from fedbicross_flwr import training
from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.training import accuracy, predict_logits

CPU = torch.device("cpu")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_resnet18(1, 4).eval()


def _split(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def test_bf16_logits_are_close_to_fp32_and_the_model_layout_is_restored() -> None:
    # Prepare
    model, (x, _) = _model(0), _split()
    # Execute
    fp32 = predict_logits(model, x, CPU, batch_size=16)
    bf16 = predict_logits(model, x, CPU, batch_size=16, precision="bf16")
    # Assert: bf16 has 8 mantissa bits; through 18 layers the logits stay within a few 1e-2
    assert fp32.dtype == bf16.dtype == torch.float32
    assert fp32.shape == bf16.shape == (48, 4)
    assert not torch.equal(fp32, bf16)  # really another precision
    assert torch.allclose(fp32, bf16, atol=0.1 * float(fp32.abs().max()))
    conv = model.conv1.weight
    assert conv.is_contiguous()  # channels-last storage was undone
    model.to(memory_format=torch.channels_last)  # a channels-last model stays channels-last
    assert torch.equal(predict_logits(model, x, CPU, batch_size=16, precision="bf16"), bf16)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_shared_split_accuracy_forwards_each_distinct_model_once() -> None:
    # Prepare: two clients receive the same model (equal state, distinct objects), one another
    training._SHARED_EVAL.clear()
    x, y = _split()
    same_a, same_b, other = _model(0), _model(0), _model(1)
    forwards = []
    for m in (same_a, same_b, other):
        m.register_forward_hook(lambda mod, inp, out: forwards.append(mod))
    # Execute
    acc_a = training.shared_split_accuracy(same_a, x, y, CPU)
    acc_b = training.shared_split_accuracy(same_b, x, y, CPU)
    acc_other = training.shared_split_accuracy(other, x, y, CPU)
    # Assert: the value is accuracy()'s, and the twin was not forwarded
    assert acc_a == acc_b == accuracy(_model(0), x, y, CPU)
    assert acc_other == accuracy(_model(1), x, y, CPU)
    assert forwards.count(same_a) == 1 and forwards.count(same_b) == 0
    assert forwards.count(other) == 1


def test_shared_split_accuracy_does_not_mix_splits_or_precisions() -> None:
    # Prepare
    training._SHARED_EVAL.clear()
    model = _model(0)
    x, y = _split()
    x2, y2 = x[:10].clone(), (y[:10] + 1) % 4  # another split: other labels
    # Execute
    acc = training.shared_split_accuracy(model, x, y, CPU)
    acc2 = training.shared_split_accuracy(model, x2, y2, CPU)
    training.shared_split_accuracy(model, x, y, CPU, "bf16")
    # Assert
    assert acc2 == accuracy(model, x2, y2, CPU)
    assert acc == accuracy(model, x, y, CPU)
    assert len(training._SHARED_EVAL) == 3


def test_model_fingerprint_changes_with_one_value() -> None:
    # Prepare
    a, b = _model(0), _model(0)
    # Execute
    with torch.no_grad():
        b.fc.bias[0] += 1e-6
    # Assert
    assert training.model_fingerprint(a) == training.model_fingerprint(_model(0))
    assert training.model_fingerprint(a) != training.model_fingerprint(b)


def test_eval_precision_is_validated() -> None:
    assert RunConfig.from_run_config({"eval-precision": "bf16"}).eval_precision == "bf16"
    with pytest.raises(ConfigError, match="eval-precision"):
        RunConfig.from_run_config({"eval-precision": "fp16"})
