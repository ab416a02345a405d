"""The server rejects unusable uploads with a reason (nothing it sent reaches a method)."""

from __future__ import annotations

import pytest
import torch

from fedbicross_flwr.model import weighted_average
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.server import validate_upload


@pytest.fixture(scope="module")
def reference() -> dict:
    return build_resnet18(1, 3).state_dict()


def test_a_matching_model_is_accepted(reference) -> None:
    assert validate_upload(build_resnet18(1, 3).state_dict(), reference) is None


@pytest.mark.parametrize("mutate,fragment", [
    (lambda s: s.pop("fc.bias"), "missing ['fc.bias']"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "extra ['extra.weight']"),
    (lambda s: s.__setitem__("fc.weight", torch.zeros(4, 512)), "fc.weight has shape (4, 512)"),
    (lambda s: s.__setitem__("fc.bias", torch.zeros(3, dtype=torch.float64)), "dtype"),
    (lambda s: s["layer1.0.conv1.weight"].view(-1).__setitem__(0, float("nan")), "NaN or Inf"),
    (lambda s: s["bn1.running_var"].__setitem__(0, float("inf")), "NaN or Inf"),
])
def test_bad_uploads_are_rejected_with_a_reason(reference, mutate, fragment) -> None:
    state = {k: v.clone() for k, v in reference.items()}
    mutate(state)
    reason = validate_upload(state, reference)
    assert reason is not None and fragment in reason


def test_weighted_average_by_hand() -> None:
    # Prepare: two tiny "models" with a float weight and an integer BN counter
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([5.0, 7.0]), "n": torch.tensor(20)}
    # Execute: weights 1:3
    avg = weighted_average([a, b], [1.0, 3.0])
    # Assert: (1*1 + 3*5)/4 = 4, (1*3 + 3*7)/4 = 6, counter (10 + 60)/4 = 17.5 -> 18
    assert torch.allclose(avg["w"], torch.tensor([4.0, 6.0]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 18


def test_non_finite_server_models_are_never_sent(tmp_path):
    # Prepare: one finite and one diverged outgoing model
    from fedbicross_flwr.server import check_finite_models

    good = {"w": torch.ones(2), "n": torch.tensor(3)}
    bad = {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)}
    # Execute / Assert
    check_finite_models("fedbicross", {0: good, 1: good}, tmp_path)  # no error
    with pytest.raises(FloatingPointError, match=r"partitions \[2\].*'w'"):
        check_finite_models("fedbicross", {0: good, 2: bad}, tmp_path)
