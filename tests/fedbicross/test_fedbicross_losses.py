"""Losses: Eq. 5 (KD, lambda_t), Eq. 2 priors (TV, BN statistics), Eq. 9 (personalization)."""

import math

import pytest
import torch
from torch import nn

from fedbicross_flwr.client import personalization_loss
from fedbicross_flwr.distill.losses import BNStatsHook, channel_moments, kd_kl, kd_loss, tv_loss
from fedbicross_flwr.fedbicross.losses import lambda_schedule

LN2 = math.log(2.0)


def test_lambda_schedule_is_one_minus_t_over_T():
    assert lambda_schedule(1, 4) == pytest.approx(0.75)
    assert lambda_schedule(2, 4) == pytest.approx(0.5)
    assert lambda_schedule(4, 4) == 0.0
    with pytest.raises(ValueError):
        lambda_schedule(5, 4)


def test_kd_kl_hand_computed():
    # Prepare: uniform student; teacher rows one-hot (KL = ln 2) and uniform (KL = 0).
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # Execute
    value = kd_kl(student, teacher, tau=2.0)
    # Assert: tau^2 * batch mean = 4 * (ln2 + 0) / 2
    assert value.item() == pytest.approx(4 * LN2 / 2)


def test_kd_loss_eq5_mixes_the_two_teachers_with_lambda():
    # Prepare
    student = torch.zeros(1, 2)
    noise_teacher = torch.tensor([[1.0, 0.0]])  # KL = ln 2
    teacher = torch.tensor([[0.5, 0.5]])  # KL = 0
    # Execute
    value = kd_loss(student, noise_teacher, teacher, lam=0.25, tau=3.0)
    # Assert: 0.25 * 9 * ln2 + 0.75 * 0
    assert value.item() == pytest.approx(0.25 * 9 * LN2)
    swapped = kd_loss(student, teacher, noise_teacher, lam=0.25, tau=3.0)
    assert swapped.item() == pytest.approx(0.75 * 9 * LN2)


def test_tv_loss_hand_computed():
    # Prepare: x = [[0, 1], [2, 3]]
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # Execute
    value = tv_loss(x)
    # Assert: horizontal |(-1,-1)| = sqrt2, vertical |(-2,-2)| = 2 sqrt2, diagonals |2-1| = 1 and |0-3| = 3
    assert value.item() == pytest.approx(3 * math.sqrt(2) + 4)


def _bn(mean, var) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(mean))
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
    return bn.eval()


def test_bn_stats_hook_hand_computed_and_hooks_removed():
    # Prepare: input with channel 0 values {0, 2, 4, 6} (mean 3, biased var 5), channel 1 zeros.
    x = torch.zeros(2, 2, 1, 2)
    x[0, 0, 0] = torch.tensor([0.0, 2.0])
    x[1, 0, 0] = torch.tensor([4.0, 6.0])
    model_a = nn.Sequential(_bn([1.0, 0.0], [2.0, 1.0]))
    # Two BN layers; the first is an identity (running var 1 - eps), so both see x.
    eps = 1e-5
    model_b = nn.Sequential(_bn([0.0, 0.0], [1.0 - eps, 1.0 - eps]), _bn([0.0, 0.0], [1.0, 1.0]))
    # model_a: ||(3-1, 0-0)|| + ||(5-2, 0-1)|| = 2 + sqrt(10)
    r_a = 2 + math.sqrt(10)
    # model_b, per layer: ||(3, 0)|| + ||(5-1, 0-1)|| = 3 + sqrt(17), twice (layers summed)
    r_b = 2 * (3 + math.sqrt(17))
    # Execute
    with BNStatsHook([model_a, model_b]) as hook:
        model_a(x)
        model_b(x)
        per_model = hook.per_model()
        mean_loss, sum_loss = hook.loss("mean"), hook.loss("sum")
    # Assert
    assert per_model.tolist() == pytest.approx([r_a, r_b], rel=1e-4)
    assert mean_loss.item() == pytest.approx((r_a + r_b) / 2, rel=1e-4)
    assert sum_loss.item() == pytest.approx(r_a + r_b, rel=1e-4)
    for module in [*model_a.modules(), *model_b.modules()]:
        assert len(module._forward_hooks) == 0


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_channel_moments_match_var_mean_with_gradients(layout, dtype):
    # Prepare: an activation whose channels have different means and spreads
    torch.manual_seed(0)
    base = torch.randn(6, 5, 7, 7, dtype=torch.float64) * torch.arange(1.0, 6.0).view(1, 5, 1, 1)
    base = base + torch.linspace(-2.0, 3.0, 5, dtype=torch.float64).view(1, 5, 1, 1)
    a = base.to(dtype).contiguous(memory_format=layout).requires_grad_(True)
    ref_in = a.detach().double().requires_grad_(True)
    weights = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    # Execute
    mean, var = channel_moments(a)
    ((mean.double() * weights).sum() + (var.double() * weights).sum()).backward()
    ref_var, ref_mean = torch.var_mean(ref_in, dim=(0, 2, 3), unbiased=False)
    ((ref_mean * weights).sum() + (ref_var * weights).sum()).backward()
    # Assert: float32 statistics of a bf16 input (float64 kept), same values and gradients
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(mean.double(), ref_mean, rtol=tol, atol=tol)
    assert torch.allclose(var.double(), ref_var, rtol=tol, atol=tol)
    assert torch.allclose(a.grad.double(), ref_in.grad, rtol=1e-2 if dtype == torch.bfloat16 else tol,
                          atol=1e-2 if dtype == torch.bfloat16 else tol)


def test_channel_moments_backward_passes_gradcheck_in_channels_last():
    # Prepare: a small float64 channels-last activation (the one-pass custom backward)
    torch.manual_seed(1)
    a = (torch.randn(3, 4, 2, 3, dtype=torch.float64) + 0.5)
    a = a.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    # Execute / Assert: analytic gradients equal finite differences, also when only one
    # of the two moments reaches the loss (the other incoming gradient is None)
    assert torch.autograd.gradcheck(lambda x: channel_moments(x), (a,))
    assert torch.autograd.gradcheck(lambda x: channel_moments(x)[1].pow(2).sum(), (a,))
    assert torch.autograd.gradcheck(lambda x: channel_moments(x)[0].sum(), (a,))


def test_bn_stats_hook_compiles_one_graph_for_every_member_and_cluster_size():
    # Prepare: five members of one architecture in two "clusters" of 3 and 2, compiled with a
    # counting backend (no inductor), and their eager R_BN for comparison
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _bn([0.1] * 4, [1.5] * 4)).eval()
               for _ in range(5)]
    x = torch.randn(3, 1, 5, 5)
    counter = CompileCounter()
    compiled = [torch.compile(m, backend=counter) for m in members]
    # Execute
    losses = []
    for cluster in ([0, 1, 2], [3, 4], [0, 1, 2]):
        with BNStatsHook([members[i] for i in cluster]) as hook:
            hook.reset()
            for i in cluster:
                compiled[i](x)
            compiled_loss = hook.loss("mean")
            hook.reset()
            for i in cluster:
                members[i](x)
            losses.append((compiled_loss, hook.loss("mean")))
    # Assert: one compiled frame for all positions and sizes, same R_BN as eager, hooks gone
    assert counter.frame_count == 1
    for compiled_loss, eager_loss in losses:
        assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)
    assert all(not hasattr(m[1], "_bn_stats_terms") and not m[1]._forward_hooks for m in members)


def test_bn_stats_hook_removed_on_exception():
    # Prepare
    model = nn.Sequential(_bn([0.0], [1.0]))
    # Execute
    with pytest.raises(RuntimeError, match="boom"):
        with BNStatsHook([model]):
            assert len(model[0]._forward_hooks) == 1
            raise RuntimeError("boom")
    # Assert
    assert len(model[0]._forward_hooks) == 0


def test_personalization_loss_eq9_golden_value():
    # Prepare: f_pers uniform, label 0; G_k -> (3/4, 1/4); f_i -> (1/4, 3/4).
    logits = torch.zeros(1, 2)
    labels = torch.tensor([0])
    cluster_logits = torch.tensor([[math.log(3.0), 0.0]])
    own_logits = torch.tensor([[0.0, math.log(3.0)]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL((3/4,1/4) || (1/2,1/2)), same for the mirror
    # Execute
    value = personalization_loss(logits, labels, cluster_logits, own_logits, gamma=0.5, delta=0.3)
    # Assert: CE = ln 2, plus 0.5 KL + 0.3 KL
    assert value.item() == pytest.approx(LN2 + 0.8 * kl)
    assert value.item() == pytest.approx(0.797797, abs=1e-6)


def test_personalization_loss_does_not_backprop_into_teachers():
    logits = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.zeros(1, 2, requires_grad=True)
    personalization_loss(logits, torch.tensor([1]), teacher, teacher, 0.5, 0.3).backward()
    assert teacher.grad is None and logits.grad is not None


def test_every_public_name_of_the_fedbicross_package_resolves() -> None:
    # The package imports its names lazily (no torch at import); a stale entry would only
    # fail when a user first touches the name.
    import fedbicross_flwr.fedbicross as package

    for name in package.__all__:
        assert getattr(package, name) is not None, name
    assert "personalization_loss" not in package.__all__  # Eq. 9 is the client's
