"""The server rejects unusable uploads with a reason (nothing it sent reaches a method)."""

from __future__ import annotations

import pytest
import torch

from fedbicross_flwr.model import build_resnet18, weighted_average
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


def _scaled(state: dict, factor: float) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not key.endswith(("running_mean", "running_var")):
            value.mul_(factor)


@pytest.mark.parametrize("mutate,fragment", [
    # finite but poisoned: every client would receive a model with NaN outputs
    (lambda s: s["bn1.running_var"].fill_(-1e6), "bn1.running_var has a BatchNorm variance <= 0"),
    (lambda s: s["layer3.1.bn2.running_var"].__setitem__(5, 0.0), "variance <= 0"),
    (lambda s: _scaled(s, 1e30), "above the bound 10000 for a trained ResNet-18"),
    (lambda s: s["fc.weight"].__setitem__((0, 0), 3.4e38), "fc.weight holds a weight of "
                                                           "absolute value 3.4e+38"),
    (lambda s: s["layer1.0.bn1.running_mean"].fill_(3.4e38), "BatchNorm mean"),
    (lambda s: s["layer1.0.bn1.running_var"].fill_(3.4e38), "BatchNorm variance of absolute"),
    (lambda s: s["bn1.num_batches_tracked"].fill_(-5), "bn1.num_batches_tracked is negative"),
    # not a tensor: a clear reason, no crash
    (lambda s: s.__setitem__("fc.bias", [0.0, 0.0, 0.0]), "fc.bias is a list, not a tensor"),
])
def test_finite_poisoned_uploads_are_rejected_with_a_reason(reference, mutate, fragment) -> None:
    state = {k: v.clone() for k, v in reference.items()}
    mutate(state)
    reason = validate_upload(state, reference)
    assert reason is not None and fragment in reason, reason


def test_an_upload_that_is_not_a_state_dict_is_rejected(reference) -> None:
    assert validate_upload([1, 2, 3], reference) == "the upload is a list, not a state dict"
    reason = validate_upload({**reference, 7: torch.zeros(1)}, reference)
    assert reason is not None and "extra ['7']" in reason


def test_the_probe_forward_refuses_a_model_that_passes_every_bound(reference) -> None:
    # Prepare: weights x 20 stay far below the bound but explode through 20 conv layers
    from fedbicross_flwr.model import probe_for

    probe = probe_for(reference)
    state = {k: v.clone() for k, v in reference.items()}
    _scaled(state, 20.0)
    # Execute / Assert: the value checks pass, the forward pass does not
    assert validate_upload(state, reference) is None
    reason = validate_upload(state, reference, probe)
    assert reason is not None and "forward pass on the fixed probe batch" in reason
    assert validate_upload(reference, reference, probe) is None


def test_an_unusable_outgoing_model_stops_the_run_naming_the_extreme_upload(reference,
                                                                          tmp_path) -> None:
    # Prepare: two accepted uploads; a "method" output with a zero BN variance
    from fedbicross_flwr.methods.base import ClientUpload, check_outgoing_models
    from fedbicross_flwr.model import probe_for

    big = {k: v.clone() for k, v in reference.items()}
    big["fc.weight"].mul_(100.0)
    uploads = [ClientUpload(0, reference, 10), ClientUpload(3, big, 10)]
    broken = {k: v.clone() for k, v in reference.items()}
    broken["layer2.0.bn1.running_var"].zero_()
    probe = probe_for(reference)
    # Execute / Assert: a good output passes; the broken one names partition and culprit
    check_outgoing_models("fedavg1", {0: reference, 3: reference}, uploads, probe, tmp_path)
    with pytest.raises(FloatingPointError) as err:
        check_outgoing_models("fedavg1", {0: reference, 3: broken}, uploads, probe, tmp_path)
    message = str(err.value)
    assert "partitions [3]" in message and "layer2.0.bn1.running_var" in message
    assert "most extreme upload it was given is partition 3's (|fc.weight|" in message
    assert "Nothing was sent" in message
    exploding = {k: v.clone() for k, v in reference.items()}
    _scaled(exploding, 20.0)
    with pytest.raises(FloatingPointError, match="forward pass on the fixed probe batch"):
        check_outgoing_models("fedavg1", {0: exploding}, uploads, probe, tmp_path)


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
    from fedbicross_flwr.methods.base import check_finite_models

    good = {"w": torch.ones(2), "n": torch.tensor(3)}
    bad = {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)}
    # Execute / Assert
    check_finite_models("fedbicross", {0: good, 1: good}, tmp_path)  # no error
    with pytest.raises(FloatingPointError, match=r"partitions \[2\].*'w'"):
        check_finite_models("fedbicross", {0: good, 2: bad}, tmp_path)
