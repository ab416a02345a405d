"""Shared generator machinery of DENSE / Co-Boosting / DAFL, and Co-Boosting's pieces,
against hand-computed values.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fedbicross_flwr.distill.schedule import step_schedule
from fedbicross_flwr.distill.utils import cpu_generator
from fedbicross_flwr.methods.baselines.coboosting import ods_perturbation, update_ensemble_weights
from fedbicross_flwr.methods.baselines.generator import (
    Generator,
    RoundSettings,
    SyntheticPool,
    adversarial_loss,
    disagreement_mask,
    ensemble_logits,
    hard_sample_ce,
    information_entropy_loss,
    train_generator_round,
)
from tests.tiny_models import TinyCNN

STUDENT = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
TEACHER = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 6.0]])


def _kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q)), written out."""
    zp = sum(math.exp(v) for v in p_logits)
    zq = sum(math.exp(v) for v in q_logits)
    p = [math.exp(v) / zp for v in p_logits]
    q = [math.exp(v) / zq for v in q_logits]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_dense_mask_selects_exactly_the_disagreeing_samples():
    # Prepare: argmax student = [0, 1, 0, 2], argmax teacher = [0, 0, 1, 2]
    # Execute
    mask = disagreement_mask(STUDENT, TEACHER)
    masked = adversarial_loss(STUDENT, TEACHER, tau=1.0, masked=True)
    full = adversarial_loss(STUDENT, TEACHER, tau=1.0, masked=False)
    # Assert: samples 1 and 2 only; the loss is minus their KL summed over the batch of 4
    assert mask.tolist() == [False, True, True, False]
    kls = [_kl(TEACHER[b].tolist(), STUDENT[b].tolist()) for b in range(4)]
    assert masked.item() == pytest.approx(-(kls[1] + kls[2]) / 4, rel=1e-5)
    assert full.item() == pytest.approx(-sum(kls) / 4, rel=1e-5)


def test_adversarial_loss_scales_with_temperature_squared():
    tau = 3.0
    kls = [_kl((TEACHER[b] / tau).tolist(), (STUDENT[b] / tau).tolist()) for b in range(4)]
    loss = adversarial_loss(STUDENT, TEACHER, tau=tau, masked=False)
    assert loss.item() == pytest.approx(-tau**2 * sum(kls) / 4, rel=1e-5)


def test_hard_sample_ce_and_information_entropy_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = [.75, .25], [.5, .5]
    targets = torch.tensor([0, 1])
    # (1 - p_y)^2 * CE: (0.25^2 * -log .75 + 0.5^2 * -log .5) / 2
    expected = (0.25**2 * -math.log(0.75) + 0.5**2 * -math.log(0.5)) / 2
    assert hard_sample_ce(logits, targets, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # mean prediction [0.625, 0.375]: sum p log10 p
    pbar = [0.625, 0.375]
    expected_ie = sum(p * math.log10(p) for p in pbar)
    assert information_entropy_loss(logits).item() == pytest.approx(expected_ie, rel=1e-5)


def _constant_bn_input_member(bias: list[float], running_mean: list[float],
                              running_var: list[float]) -> TinyCNN:
    """A TinyCNN whose BN input is the conv bias everywhere (conv weights zero)."""
    model = TinyCNN(in_channels=1, num_classes=3, width=2)
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.copy_(torch.tensor(bias))
        model.bn.running_mean.copy_(torch.tensor(running_mean))
        model.bn.running_var.copy_(torch.tensor(running_var))
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_generator_bn_statistics_loss_matches_hand_computation(reduction):
    # Prepare: BN inputs are constant per channel whatever the image, so batch mean = bias,
    # batch variance = 0 and r = ||bias - running_mean|| + ||0 - running_var||.
    m1 = _constant_bn_input_member([1.0, 2.0], [0.0, 0.0], [3.0, 4.0])  # r = sqrt(5) + 5
    m2 = _constant_bn_input_member([0.5, 0.5], [0.5, -0.5], [1.0, 0.0])  # r = 1 + 1
    r1, r2 = math.sqrt(5.0) + 5.0, 2.0
    student = TinyCNN(1, 3, width=2).eval()
    generator = Generator(latent=8, out_channels=1, ngf=4)
    settings = RoundSettings(steps=1, batch=6, lr=1e-3, latent=8, bn_weight=1.0, ce_weight=0.0,
                             adv_weight=0.0, bn_reduction=reduction)
    # Execute
    images, targets, diag = train_generator_round(generator, [m1, m2], student, settings, seed=0)
    # Assert
    expected = r1 + r2 if reduction == "sum" else (r1 + r2) / 2
    assert diag["bn"] == pytest.approx(expected, rel=1e-5)
    assert diag["best_loss"] == pytest.approx(expected, rel=1e-5)
    assert images.shape == (6, 1, 28, 28) and targets.shape == (6,)
    assert images.min() >= -1.0 and images.max() <= 1.0  # sigmoid pixels, normalised space
    assert not student.training  # restored (it was in eval mode)


def test_generator_round_is_seeded_and_trains_towards_targets():
    torch.manual_seed(0)
    members = [TinyCNN(1, 3, width=4).eval().requires_grad_(False) for _ in range(2)]
    student = TinyCNN(1, 3, width=4).train()
    settings = RoundSettings(steps=15, batch=12, lr=0.05, latent=8, bn_weight=0.0,
                             ce_weight=1.0, adv_weight=0.5)
    g = Generator(latent=8, out_channels=1, ngf=4)
    a, ya, da = train_generator_round(g, members, student, settings, seed=3)
    b, yb, db = train_generator_round(g, members, student, settings, seed=3)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert student.training  # flags restored
    one_step = train_generator_round(g, members, student,
                                     RoundSettings(**{**settings.__dict__, "steps": 1}), seed=3)
    assert da["best_loss"] < one_step[2]["best_loss"]  # 15 Adam steps lowered the loss


def test_coboosting_weights_follow_the_sign_gradient_and_stay_in_unit_interval():
    # Prepare: member 0 is right on every sample, member 1 always wrong
    y = torch.tensor([0, 1, 2, 0])
    right = F.one_hot(y, 3).float() * 4.0  # (B, C)
    wrong = F.one_hot((y + 1) % 3, 3).float() * 4.0
    batches = [(torch.zeros(4, 1), y)] * 3
    logits_fn = lambda x: torch.stack([right, wrong])  # noqa: E731
    w0 = torch.tensor([0.5, 0.5])
    # Execute: 3 batches, step 0.1 -> +-0.3; then a huge step: clipped to [0, 1]
    w = update_ensemble_weights(None, batches, w0, 0.1, logits_fn=logits_fn)
    w_big = update_ensemble_weights(None, batches, w0, 5.0, logits_fn=logits_fn)
    # Assert
    assert w.tolist() == pytest.approx([0.8, 0.2])
    assert w_big.tolist() == [1.0, 0.0]
    assert w0.tolist() == [0.5, 0.5]  # input not modified


def test_coboosting_weight_step_that_zeroes_all_weights_is_skipped():
    y = torch.tensor([0, 1])
    wrong = F.one_hot((y + 1) % 3, 3).float() * 4.0
    worse = F.one_hot((y + 2) % 3, 3).float() * 8.0
    w = update_ensemble_weights(None, [(torch.zeros(2, 1), y)], torch.tensor([0.05, 0.05]), 1.0,
                                logits_fn=lambda x: torch.stack([wrong, worse]))
    assert w.sum() > 0


def test_weighted_ensemble_divides_by_the_sum_of_weights():
    logits = torch.tensor([[[1.0, 0.0]], [[0.0, 4.0]]])  # (N=2, B=1, C=2)
    out = ensemble_logits(logits, torch.tensor([0.2, 0.6]))
    assert out[0].tolist() == pytest.approx([0.25, 3.0])  # (0.2*[1,0] + 0.6*[0,4]) / 0.8


def test_ods_moves_every_pixel_by_eta():
    torch.manual_seed(0)
    teacher = TinyCNN(1, 3).eval()
    x = torch.randn(4, 1, 6, 6)
    out = ods_perturbation(lambda v: teacher(v), x, 0.1, 4.0, cpu_generator(0))
    assert torch.allclose((out - x).abs(), torch.full_like(x, 0.1))
    assert torch.equal(ods_perturbation(lambda v: teacher(v), x, 0.0, 4.0, cpu_generator(0)), x)


def test_pool_batches_visit_every_image_once():
    pool = SyntheticPool()
    pool.add(torch.arange(5.0).view(5, 1), torch.arange(5), torch.zeros(5, 2))
    pool.add(torch.arange(5.0, 8.0).view(3, 1), torch.arange(5, 8), torch.ones(3, 2))
    seen = torch.cat([x for x, _, _ in pool.batches(3, seed=1)]).flatten().tolist()
    assert len(pool) == 8 and sorted(seen) == list(range(8))
    for x, y, logits in pool.batches(3, seed=1):  # images, targets and logits stay aligned
        assert torch.equal(x.flatten().long(), y)
        assert torch.equal(logits[:, 0], (y >= 5).float())


def test_step_schedule_milestones():
    assert [step_schedule(e, 4, 1.0, (0.5, 0.75)) for e in range(4)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01])
    assert step_schedule(0, 1, 1.0, (0.5, 0.75)) == 1.0  # one epoch: no decay
