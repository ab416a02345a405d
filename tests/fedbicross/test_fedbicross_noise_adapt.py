"""Eq. 3: noise-adapted teachers (reverse-order BN update) and precomputed soft labels."""

import math

import pytest
import torch
from torch import nn

from fedbicross_flwr.distill.noise_adapt import (
    effective_steps,
    noise_adapted_copy,
    soft_label_profile,
    teacher_soft_labels,
)
from fedbicross_flwr.distill.synthesis import EnsembleTeacher
from tests.tiny_models import ConstantLogits, make_tiny


def _trajectory() -> torch.Tensor:
    # T=3, B=2, one channel, 1x1 images: x^(1) = {0, 2}, x^(2) = {1, 3}, x^(3) = {4, 4}
    return torch.tensor([[0.0, 2.0], [1.0, 3.0], [4.0, 4.0]]).view(3, 2, 1, 1, 1)


def test_reverse_order_bn_update_hand_computed():
    # Prepare: one BN layer, running stats (0, 1), cumulative momentum (None) to be overridden.
    member = nn.Sequential(nn.BatchNorm2d(1, momentum=None)).eval()
    # By hand, beta = 0.9, batch (mean, unbiased var), visiting x^(3), x^(2), x^(1):
    #   x^(3): (4, 0) -> mean 0.9*0 + 0.1*4 = 0.4,        var 0.9*1    + 0.1*0 = 0.9
    #   x^(2): (2, 2) -> mean 0.9*0.4 + 0.1*2 = 0.56,     var 0.9*0.9  + 0.1*2 = 1.01
    #   x^(1): (1, 2) -> mean 0.9*0.56 + 0.1*1 = 0.604,   var 0.9*1.01 + 0.1*2 = 1.109
    # (forward order would give 0.661 and 1.071)
    # Execute
    (adapted,) = noise_adapted_copy([member], _trajectory(), beta=0.9, mode="eval")
    # Assert
    bn = adapted[0]
    assert bn.running_mean.item() == pytest.approx(0.604)
    assert bn.running_var.item() == pytest.approx(1.109)
    assert not adapted.training and not bn.training
    # The original member is untouched.
    assert member[0].running_mean.item() == 0.0 and member[0].running_var.item() == 1.0
    assert member[0].momentum is None


@pytest.mark.parametrize("steps, beta, cutoff, expected", [
    (500, 0.9, 1e-7, 153),  # ceil(log(1e-7) / log(0.9)) = ceil(152.98)
    (100, 0.9, 1e-7, 100),  # never more than T
    (500, 0.9, 0.0, 500),   # no cutoff
    (10, 0.5, 0.3, 2),      # ceil(1.74)
    (10, 0.0, 1e-7, 1),     # beta 0: only x^(1) survives
    (10, 1.0, 1e-7, 10),    # beta 1: nothing is forgotten
])
def test_effective_steps_hand_computed(steps, beta, cutoff, expected):
    assert effective_steps(steps, beta, cutoff) == expected


def test_cutoff_skips_the_late_steps_hand_computed():
    # Prepare: beta = 0.5, cutoff 0.3 -> L = 2: only x^(2) then x^(1) are forwarded.
    member = nn.Sequential(nn.BatchNorm2d(1)).eval()
    # By hand from (0, 1): x^(2): (2, 2) -> mean 0.5*0 + 0.5*2 = 1,   var 0.5*1 + 0.5*2 = 1.5
    #                      x^(1): (1, 2) -> mean 0.5*1 + 0.5*1 = 1,   var 0.5*1.5 + 0.5*2 = 1.75
    # (all three steps: mean 1.5, var 1.625)
    # Execute
    (cut,) = noise_adapted_copy([member], _trajectory(), beta=0.5, cutoff=0.3)
    (full,) = noise_adapted_copy([member], _trajectory(), beta=0.5)
    # Assert
    assert (cut[0].running_mean.item(), cut[0].running_var.item()) == pytest.approx((1.0, 1.75))
    assert (full[0].running_mean.item(), full[0].running_var.item()) == pytest.approx((1.5, 1.625))
    with pytest.raises(ValueError, match="cutoff"):
        noise_adapted_copy([member], _trajectory(), beta=0.5, cutoff=1.0)


def test_cutoff_error_is_bounded_by_the_skipped_weight_times_the_spread():
    # Prepare: a conv-BN net, T = 40, beta = 0.9, cutoff 0.05 -> L = 29; the per-step batch
    # statistics s_t of every BN layer (beta 0 keeps exactly the last batch's).
    member = make_tiny(0).eval()
    gen = torch.Generator().manual_seed(3)
    trajectory = torch.randn(40, 6, 1, 5, 5, generator=gen) * torch.linspace(3, 0.5, 40).view(
        40, 1, 1, 1, 1)
    names = [n for n, b in member.named_buffers() if "running" in n]
    per_step = [dict(noise_adapted_copy([member], trajectory[t:t + 1], beta=0.0)[0]
                     .named_buffers()) for t in range(40)]
    original = dict(member.named_buffers())
    # Execute
    (cut,) = noise_adapted_copy([member], trajectory, beta=0.9, cutoff=0.05)
    (full,) = noise_adapted_copy([member], trajectory, beta=0.9)
    # Assert: diff = sum_{t > L} (1-beta) beta^(t-1) (original - s_t), so
    # |diff| <= beta^L * max_{t > L} |original - s_t| (the bound the docstring states)
    L = effective_steps(40, 0.9, 0.05)
    assert L == 29
    cut_b, full_b = dict(cut.named_buffers()), dict(full.named_buffers())
    for name in names:
        spread = torch.stack([(original[name] - per_step[t][name]).abs() for t in range(L, 40)])
        diff = (cut_b[name] - full_b[name]).abs()
        assert (diff <= 0.9 ** L * spread.max(dim=0).values + 1e-6).all(), name
        assert diff.max() > 0  # the skipped steps did matter a little


def test_train_mode_variant_keeps_bn_in_train_mode_and_uses_batch_statistics():
    # Prepare
    member = make_tiny(0)
    trajectory = torch.randn(4, 6, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    # Execute
    (paper,) = noise_adapted_copy([member], trajectory, 0.9, "eval")
    (fedisca,) = noise_adapted_copy([member], trajectory, 0.9, "train")
    p_paper = teacher_soft_labels(EnsembleTeacher([paper], bn_mode="eval"), trajectory, tau=1.0)
    p_fedisca = teacher_soft_labels(EnsembleTeacher([fedisca], bn_mode="train"), trajectory, tau=1.0)
    # Assert: different predictions (batch vs running statistics); in train mode the adapted
    # statistics would never be read, so the reverse pass is skipped
    assert torch.equal(fedisca.bn.running_mean, member.bn.running_mean)
    assert not torch.equal(paper.bn.running_mean, member.bn.running_mean)
    assert fedisca.bn.training and not paper.bn.training
    assert p_paper.shape == p_fedisca.shape == (4, 6, 3)
    assert not torch.allclose(p_paper, p_fedisca)
    # Batch statistics: step t's labels equal a train-mode forward of x^(t) alone.
    fedisca.train()
    with torch.no_grad():
        expected = torch.softmax(fedisca(trajectory[2]), dim=1)
    assert torch.allclose(p_fedisca[2], expected, atol=1e-6)
    assert all(not p.requires_grad for p in paper.parameters())


def test_soft_labels_hand_computed_for_both_ensembles_and_temperature():
    # Prepare: members with constant logits (0, ln 3) -> (1/4, 3/4) and (0, 0) -> (1/2, 1/2)
    members = [ConstantLogits([0.0, float(torch.log(torch.tensor(3.0)))]), ConstantLogits([0.0, 0.0])]
    trajectory = torch.zeros(5, 2, 1, 4, 4)
    sqrt3 = 3**0.5
    # Execute
    p_prob = teacher_soft_labels(EnsembleTeacher(members, "prob"), trajectory, tau=1.0, chunk=2)
    p_logit = teacher_soft_labels(EnsembleTeacher(members, "logit"), trajectory, tau=1.0)
    p_tau = teacher_soft_labels(EnsembleTeacher(members[:1], "prob"), trajectory, tau=2.0)
    # Assert
    assert p_prob.shape == (5, 2, 2)
    assert p_prob[3, 1].tolist() == pytest.approx([0.375, 0.625])  # mean of probabilities
    assert p_logit[0, 0].tolist() == pytest.approx([1 / (1 + sqrt3), sqrt3 / (1 + sqrt3)])
    # tau = 2 on logits (0, ln 3): softmax(0, ln sqrt3)
    assert p_tau[4, 0].tolist() == pytest.approx([1 / (1 + sqrt3), sqrt3 / (1 + sqrt3)])


def _resnet_with_running_stats(seed: int) -> nn.Module:
    from fedbicross_flwr.model import build_resnet18

    torch.manual_seed(seed)
    model = build_resnet18(1, 4).train()
    with torch.no_grad():  # running statistics far from the (0, 1) initialisation
        for _ in range(3):
            model(torch.randn(8, 1, 28, 28) * 3 + 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_batchnorm_folding_predicts_the_same_and_leaves_the_model_alone():
    # Prepare: two ResNet-18 members with non-trivial BN statistics and affine parameters
    from fedbicross_flwr.distill.utils import batchnorm_folded

    members = [_resnet_with_running_stats(0), _resnet_with_running_stats(1)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    trajectory = torch.randn(3, 4, 1, 28, 28)
    # Execute
    folded = batchnorm_folded(members[0])
    folded_bns = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    p_folded = teacher_soft_labels(EnsembleTeacher(members), trajectory, tau=4.0, chunk=2)
    p_plain = teacher_soft_labels(EnsembleTeacher(members), trajectory, tau=4.0, chunk=2,
                                  fold_bn=False)
    # Assert: BN is gone from the copy, predictions are unchanged, the originals untouched
    assert folded_bns == []
    assert not any(p.requires_grad for p in folded.parameters())
    x = trajectory[0]
    with torch.no_grad():
        assert torch.allclose(folded(x), members[0](x), atol=1e-4, rtol=1e-4)
    assert torch.allclose(p_folded, p_plain, atol=1e-6)
    for member, state in zip(members, before):
        assert member.training is False
        assert all(torch.equal(member.state_dict()[k], v) for k, v in state.items())
        assert any(isinstance(m, nn.BatchNorm2d) for m in member.modules())


def test_soft_label_profile_hand_computed():
    # T = 4 steps of B = 2 images, C = 2 classes, profiled in halves; targets (0, 1).
    sure, unsure = [0.9, 0.1], [0.5, 0.5]
    probs = torch.tensor([[sure, sure], [sure, sure], [unsure, [0.2, 0.8]], [unsure, [0.2, 0.8]]])
    profile = soft_label_profile(probs, torch.tensor([0, 1]), parts=2)
    h_sure = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    h_mixed = (math.log(2) - (0.2 * math.log(0.2) + 0.8 * math.log(0.8))) / 2
    assert [p["steps"] for p in profile] == [[1, 2], [3, 4]]
    assert profile[0]["argmax-histogram"] == [4, 0] and profile[1]["argmax-histogram"] == [2, 2]
    assert profile[0]["entropy"] == pytest.approx(h_sure, abs=1e-4)
    assert profile[1]["entropy"] == pytest.approx(h_mixed, abs=1e-4)
    assert profile[0]["target-agreement"] == 0.5 and profile[1]["target-agreement"] == 1.0


def test_train_mode_soft_labels_do_not_depend_on_the_running_statistics():
    # Why the reverse pass can be skipped in train mode: the same labels from a copy whose
    # running statistics were adapted and from one whose statistics are arbitrary.
    member = make_tiny(1)
    trajectory = torch.randn(3, 5, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    adapted = make_tiny(1)
    with torch.no_grad():
        adapted.bn.running_mean.add_(3.0)
        adapted.bn.running_var.mul_(7.0)
    (skipped,) = noise_adapted_copy([member], trajectory, 0.9, "train")
    p_a = teacher_soft_labels(EnsembleTeacher([adapted], bn_mode="train"), trajectory, tau=1.0)
    p_s = teacher_soft_labels(EnsembleTeacher([skipped], bn_mode="train"), trajectory, tau=1.0)
    assert torch.allclose(p_a, p_s, atol=1e-6)
