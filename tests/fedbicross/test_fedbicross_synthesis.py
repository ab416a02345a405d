"""Stage 1 synthesis (Eq. 1-2): trajectory shapes, labels, frozen members, convergence."""

import copy
import shutil

import pytest
import torch
from torch import nn

from fedbicross_flwr.distill.synthesis import balanced_labels, synthesize_trajectory
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from tests.tiny_models import make_tiny

SMALL = dict(synth_steps=30, synth_batch=12, synth_lr=0.1, noise_samples=8)


def test_balanced_labels_round_robin_and_shuffled():
    labels = balanced_labels(10, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(labels, minlength=3).tolist() == [4, 3, 3]
    assert labels.tolist() != (torch.arange(10) % 3).tolist()


def test_trajectory_shapes_members_untouched_and_hooks_removed():
    # Prepare
    members = [make_tiny(0), make_tiny(1).train()]  # one member left in train mode by the caller
    before = [copy.deepcopy(m.state_dict()) for m in members]
    settings = FedBiCrossSettings(**SMALL)
    # Execute
    trajectory, labels, diag = synthesize_trajectory(members, 3, 1, settings, seed=0, device="cpu",
                                                     image_size=6, progress=False)
    # Assert: x^(1..T) stored, every step different, balanced labels
    assert trajectory.shape == (30, 12, 1, 6, 6)
    assert not torch.equal(trajectory[0], trajectory[1])
    assert torch.bincount(labels, minlength=3).tolist() == [4, 4, 4]
    assert len(diag["ce"]) == len(diag["bn"]) == len(diag["tv"]) == 30
    # Members: same weights and BN statistics, no gradients, modes restored, no hooks left
    for member, state in zip(members, before):
        for name, value in member.state_dict().items():
            assert torch.equal(value, state[name]), name
        assert all(p.grad is None for p in member.parameters())
        assert all(len(m._forward_hooks) == 0 for m in member.modules())
    assert not members[0].training and members[1].training


def test_synthesis_is_seeded():
    members = [make_tiny(0)]
    settings = FedBiCrossSettings(**{**SMALL, "synth_steps": 3})
    a = synthesize_trajectory(members, 3, 1, settings, seed=5, device="cpu", image_size=6, progress=False)
    b = synthesize_trajectory(members, 3, 1, settings, seed=5, device="cpu", image_size=6, progress=False)
    c = synthesize_trajectory(members, 3, 1, settings, seed=6, device="cpu", image_size=6, progress=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


class ConvBNLinear(nn.Module):
    """conv -> BN -> ReLU -> linear on all positions: every logit vector is reachable."""

    def __init__(self, num_classes: int = 3, size: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * size * size, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _linear_member(seed: int) -> ConvBNLinear:
    torch.manual_seed(seed)
    model = ConvBNLinear()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("ensemble", ["prob", "logit"])
def test_teachers_classify_final_images_as_targets(ensemble):
    # Prepare: small BN weight, Adam lr 0.1 (as for a CPU budget); no jitter, since a 2-pixel
    # roll scrambles a position-dependent classifier on 6x6 images.
    members = [_linear_member(0), _linear_member(1), _linear_member(2)]
    settings = FedBiCrossSettings(**SMALL, bn_weight=0.01, ensemble=ensemble, jitter=0)
    # Execute
    _, _, diag = synthesize_trajectory(members, 3, 1, settings, seed=0, device="cpu", image_size=6,
                                       progress=False)
    # Assert: CE falls and the teacher agrees with the targets far above chance (1/3)
    assert diag["ce"][-1] < 0.5 * diag["ce"][0]
    assert diag["teacher_accuracy"] >= 0.9
    assert 0.0 <= diag["teacher_entropy"] <= diag["max_entropy"]


def test_bn_prior_is_optimised():
    # Prepare
    members = [make_tiny(0), make_tiny(1)]
    with_bn = FedBiCrossSettings(**SMALL, bn_weight=10.0, bn_reduction="sum")
    without_bn = with_bn.with_overrides(bn_weight=0.0)
    # Execute
    bn_on = synthesize_trajectory(members, 3, 1, with_bn, 0, "cpu", image_size=6, progress=False)[2]["bn"]
    bn_off = synthesize_trajectory(members, 3, 1, without_bn, 0, "cpu", image_size=6, progress=False)[2]["bn"]
    # Assert: same start, the prior term falls only when it is weighted
    assert bn_on[0] == pytest.approx(bn_off[0])
    assert bn_on[-1] < 0.7 * bn_on[0] and bn_on[-1] < 0.7 * bn_off[-1]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compiled_synthesis_matches_eager_and_leaves_members_alone():
    # Prepare: two members, float32, a few steps (inductor compiles the tiny graph once)
    members = [make_tiny(0), make_tiny(1)]
    before = [copy.deepcopy(m.state_dict()) for m in members]
    eager = FedBiCrossSettings(**{**SMALL, "synth_steps": 4})
    compiled_settings = eager.with_overrides(compile=True)
    # Execute
    x_eager, y_eager, d_eager = synthesize_trajectory(members, 3, 1, eager, seed=3, device="cpu",
                                                      image_size=6, progress=False)
    x_comp, y_comp, d_comp = synthesize_trajectory(members, 3, 1, compiled_settings, seed=3,
                                                   device="cpu", image_size=6, progress=False)
    # Assert: the same trajectory and loss terms up to float rounding; members untouched,
    # no hooks left behind, no compiled wrapper leaks out
    assert torch.equal(y_eager, y_comp)
    assert torch.allclose(x_comp, x_eager, rtol=1e-4, atol=1e-5)
    assert d_comp["bn"] == pytest.approx(d_eager["bn"], rel=1e-4)
    assert d_comp["ce"] == pytest.approx(d_eager["ce"], rel=1e-4)
    for member, state in zip(members, before):
        assert type(member).__name__ == "TinyCNN"
        assert all(torch.equal(v, state[k]) for k, v in member.state_dict().items())
        assert all(len(m._forward_hooks) == 0 for m in member.modules())


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="compile"):
        FedBiCrossSettings(compile="yes")
