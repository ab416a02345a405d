"""Stage 2: simplex projection, exact hypergradient (Eq. 8), inner step (Eq. 7), ablations."""

import copy

import numpy as np
import pytest
import torch

from fedbicross_flwr.distill.losses import kd_loss
from fedbicross_flwr.fedbicross.bilevel import (
    OnlineBilevelTrainer,
    fixed_weights,
    inner_step_and_hypergradient,
    outer_update,
    project_to_simplex,
)
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.keys.errors import ConfigError
from tests.tiny_models import make_tiny


@pytest.mark.parametrize(
    "v, expected",
    [
        ([0.5, 0.5], [0.5, 0.5]),
        ([1.0, 0.2], [0.9, 0.1]),
        ([-1.0, 2.0], [0.0, 1.0]),
        ([0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]),
        ([2.0, 2.0, -5.0], [0.5, 0.5, 0.0]),
    ],
)
def test_projection_hand_computed(v, expected):
    result = project_to_simplex(torch.tensor(v, dtype=torch.float64))
    assert result.tolist() == pytest.approx(expected)


def test_projection_properties_on_random_vectors():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        # Prepare
        v = torch.randn(5, generator=generator, dtype=torch.float64) * 3
        # Execute
        p = project_to_simplex(v)
        # Assert: on the simplex, idempotent, and optimal (KKT: v - p is constant on the support
        # and not larger off it).
        assert (p >= 0).all() and p.sum().item() == pytest.approx(1.0)
        assert torch.allclose(project_to_simplex(p), p)
        support = p > 0
        theta = (v - p)[support]
        assert torch.allclose(theta, theta[0].expand_as(theta))
        assert ((v - p)[~support] <= theta[0] + 1e-12).all()


def test_outer_update_unit_normalisation_has_length_lr_and_ignores_common_shift():
    # Prepare
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # Execute: hypergradient favours source 0 (negative = increasing w_0 lowers L_val)
    small = outer_update(w, torch.tensor([-1e-6, 1e-6], dtype=torch.float64), 0.1, "unit")
    shifted = outer_update(w, torch.tensor([100 - 1e-6, 100 + 1e-6], dtype=torch.float64), 0.1, "unit")
    raw = outer_update(w, torch.tensor([-1e-6, 1e-6], dtype=torch.float64), 0.1, "none")
    # Assert: unit step of length 0.1 along (1, -1)/sqrt2
    step = 0.1 / np.sqrt(2)
    assert small.tolist() == pytest.approx([0.5 + step, 0.5 - step])
    assert shifted.tolist() == pytest.approx(small.tolist())
    assert raw.tolist() == pytest.approx([0.5 + 1e-7, 0.5 - 1e-7])
    # K = 1: centred hypergradient is zero, the weight stays [1].
    assert outer_update(torch.ones(1, dtype=torch.float64), torch.tensor([5.0]), 0.1, "unit").tolist() == [1.0]


def _problem(num_sources: int = 3, n_train: int = 6, n_val: int = 4, classes: int = 3):
    """Random float64 inputs and soft labels for one target cluster."""
    generator = torch.Generator().manual_seed(1)

    def probs(n):
        return torch.softmax(torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2, 1)

    def images(n):
        return torch.randn(n, 1, 5, 5, generator=generator, dtype=torch.float64)

    sources = [images(n_train) for _ in range(num_sources)]
    return dict(
        source_inputs=sources,
        source_noise_probs=[probs(n_train) for _ in range(num_sources)],
        source_teacher_probs=[probs(n_train) for _ in range(num_sources)],
        val_inputs=images(n_val),
        val_noise_probs=probs(n_val),
        val_teacher_probs=probs(n_val),
    )


def _initial_momentum(model, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1 for n, p in model.named_parameters()}


STEP = dict(lam=0.4, tau=2.0, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _run(model, weights, problem, bn_mode="train"):
    model = copy.deepcopy(model)
    buffers = _initial_momentum(model)
    result = inner_step_and_hypergradient(model, weights, **problem, **STEP, momentum_buffers=buffers,
                                          bn_mode=bn_mode)
    return model, result


def _expected_eq7(reference, w, problem):
    """Eq. 7 by hand: one heavy-ball SGD step on the w-weighted KD losses of ``reference``."""
    buf = _initial_momentum(reference)
    names = [n for n, _ in reference.named_parameters()]
    params = [p for _, p in reference.named_parameters()]
    total = sum(
        w[j] * kd_loss(reference(problem["source_inputs"][j]),
                       problem["source_noise_probs"][j], problem["source_teacher_probs"][j],
                       STEP["lam"], STEP["tau"])
        for j in range(len(problem["source_inputs"]))
    )
    grads = torch.autograd.grad(total, params)
    return {
        n: p.detach() - STEP["lr"] * (STEP["momentum"] * buf[n] + g + STEP["weight_decay"] * p.detach())
        for n, p, g in zip(names, params, grads)
    }


def _finite_difference_hypergradient(model, w, problem, bn_mode="train", eps=1e-6):
    """Central differences of the validation loss after the inner step, one per weight."""
    out = []
    for j in range(len(w)):
        e = torch.zeros(len(w), dtype=torch.float64)
        e[j] = eps
        plus = _run(model, w + e, problem, bn_mode)[1].val_loss.item()
        minus = _run(model, w - e, problem, bn_mode)[1].val_loss.item()
        out.append((plus - minus) / (2 * eps))
    return out


def test_hypergradient_matches_central_finite_differences():
    # Prepare: tiny CNN with one BN layer, float64, three sources, momentum + weight decay.
    model = make_tiny(0, dtype=torch.float64)
    problem = _problem()
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    # Execute
    _, result = _run(model, w, problem)
    finite_differences = _finite_difference_hypergradient(model, w, problem)
    # Assert: exact first-order formula -eta_G <g_val, g_j> equals dL_val(G'(w))/dw_j
    analytic = result.hypergradient.tolist()
    assert analytic == pytest.approx(finite_differences, rel=1e-6, abs=1e-10)
    assert max(abs(a) for a in analytic) > 1e-6  # not the (wrong) identically-zero DARTS answer


def test_inner_step_is_eq7_with_momentum_and_bn_stats_are_weight_mixed():
    # Prepare
    model = make_tiny(0, dtype=torch.float64)
    problem = _problem()
    w = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    reference = copy.deepcopy(model).train()
    expected = _expected_eq7(reference, w, problem)
    # BN input = conv output; running stats move towards the w-weighted batch statistics.
    with torch.no_grad():
        stats = [reference.conv(x) for x in problem["source_inputs"]]
        mean_mix = sum(w[j] * s.mean(dim=(0, 2, 3)) for j, s in enumerate(stats))
        var_mix = sum(w[j] * s.var(dim=(0, 2, 3), unbiased=True) for j, s in enumerate(stats))
    expected_mean = 0.9 * model.bn.running_mean + 0.1 * mean_mix
    expected_var = 0.9 * model.bn.running_var + 0.1 * var_mix
    # Execute
    updated, _ = _run(model, w, problem)
    # Assert
    for name, p in updated.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-12), name
    assert torch.allclose(updated.bn.running_mean, expected_mean, atol=1e-12)
    assert torch.allclose(updated.bn.running_var, expected_var, atol=1e-12)


def _model_with_real_running_stats():
    # Running statistics far from the (0, 1) defaults, as after averaging trained clients.
    model = make_tiny(0, dtype=torch.float64)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.linspace(-1.0, 1.0, model.bn.num_features))
        model.bn.running_var.copy_(torch.linspace(0.5, 2.0, model.bn.num_features))
    return model


def test_eval_bn_hypergradient_matches_finite_differences():
    # Prepare: student-bn='eval' (forwards with the running statistics)
    model = _model_with_real_running_stats()
    problem = _problem()
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    # Execute
    _, result = _run(model, w, problem, bn_mode="eval")
    finite_differences = _finite_difference_hypergradient(model, w, problem, bn_mode="eval")
    # Assert
    assert result.hypergradient.tolist() == pytest.approx(finite_differences, rel=1e-6, abs=1e-10)
    assert max(abs(a) for a in result.hypergradient.tolist()) > 1e-6


def test_eval_bn_uses_running_stats_and_leaves_them_unchanged():
    # Prepare: the expected update is plain SGD on the eval-mode (running-statistics) model.
    model = _model_with_real_running_stats()
    problem = _problem()
    w = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    reference = copy.deepcopy(model).eval()
    expected = _expected_eq7(reference, w, problem)
    # Execute
    updated, _ = _run(model, w, problem, bn_mode="eval")
    train_updated, _ = _run(model, w, problem, bn_mode="train")
    # Assert: Eq. 7 with running-statistics forwards; statistics untouched (unlike 'train')
    for name, p in updated.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-12), name
    assert torch.equal(updated.bn.running_mean, model.bn.running_mean)
    assert torch.equal(updated.bn.running_var, model.bn.running_var)
    assert not torch.allclose(train_updated.bn.running_mean, model.bn.running_mean)
    with pytest.raises(ValueError, match="bn_mode"):
        _run(model, w, problem, bn_mode="frozen")


def test_keep_bn_trains_like_train_mode_but_leaves_running_stats():
    # Prepare
    model = _model_with_real_running_stats()
    problem = _problem()
    w = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    # Execute
    kept, kept_result = _run(model, w, problem, bn_mode="keep")
    trained, trained_result = _run(model, w, problem, bn_mode="train")
    # Assert: identical parameter update and losses (batch statistics in both), but 'keep'
    # leaves the running statistics exactly as they were
    for (name, a), b in zip(kept.named_parameters(), trained.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(kept_result.hypergradient, trained_result.hypergradient)
    assert torch.equal(kept.bn.running_mean, model.bn.running_mean)
    assert torch.equal(kept.bn.running_var, model.bn.running_var)
    assert not torch.equal(trained.bn.running_mean, model.bn.running_mean)


def _random_epoch(num_clusters: int, steps: int = 4, batch: int = 10, classes: int = 3, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    trajectories = [torch.randn(steps, batch, 1, 6, 6, generator=generator) for _ in range(num_clusters)]
    teacher = [torch.softmax(torch.randn(steps, batch, classes, generator=generator) * 3, -1) for _ in range(num_clusters)]
    noise = [torch.softmax(torch.randn(steps, batch, classes, generator=generator), -1) for _ in range(num_clusters)]
    return trajectories, teacher, noise


def _train(settings, num_clusters, data, init_seeds):
    students = [make_tiny(s).train() for s in init_seeds]
    trainer = OnlineBilevelTrainer(students, settings, fixed_weights(settings.weights_mode, num_clusters), "cpu")
    history = trainer.run_epoch(*data, progress=False)
    return students, history


def test_intra_weights_stay_one_hot_and_equal_training_each_cluster_alone():
    # Prepare
    settings = FedBiCrossSettings(weights_mode="intra", student_lr=0.05, bilevel_val_fraction=0.2)
    data = _random_epoch(2)
    # Execute: intra ablation with K = 2, and K = 1 on cluster 1's data only, same init
    students, history = _train(settings, 2, data, init_seeds=[10, 11])
    single = FedBiCrossSettings(num_clusters=1, student_lr=0.05, bilevel_val_fraction=0.2)
    alone, alone_history = _train(single, 1, tuple([x[1]] for x in data), init_seeds=[11])
    # Assert
    assert np.array_equal(history["weights"], np.broadcast_to(np.eye(2), (4, 2, 2)))
    assert np.array_equal(alone_history["weights"], np.ones((4, 1, 1)))
    for (name, a), b in zip(students[1].state_dict().items(), alone[0].state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_bilevel_weights_move_and_stay_on_simplex_uniform_stays_fixed():
    # Prepare
    data = _random_epoch(2)
    bilevel = FedBiCrossSettings(weights_mode="bilevel", weight_lr=0.1, student_lr=0.05)
    uniform = bilevel.with_overrides(weights_mode="uniform")
    # Execute
    _, learned = _train(bilevel, 2, data, init_seeds=[1, 2])
    _, fixed = _train(uniform, 2, data, init_seeds=[1, 2])
    # Assert
    w = learned["weights"]
    assert w.shape == (4, 2, 2)
    assert (w >= 0).all() and np.allclose(w.sum(axis=2), 1.0)
    # Unit-normalised outer steps: every step moves each row by exactly 0.1 along +-(1, -1)/sqrt2
    # (no row reaches a vertex of the simplex in 4 steps, so the projection never clips).
    steps = np.diff(np.concatenate([np.full((1, 2, 2), 0.5), w]), axis=0)
    assert np.allclose(np.abs(steps), 0.1 / np.sqrt(2))
    assert np.allclose(fixed["weights"], 0.5)
    assert np.isfinite(learned["val_loss"]).all()


def test_diverged_student_stops_with_a_clear_error():
    # Prepare: a step size that blows the tiny students up within the epoch
    data = _random_epoch(2, steps=6)
    settings = FedBiCrossSettings(weights_mode="uniform", student_lr=1e12, bilevel_val_fraction=0.2)
    # Execute / Assert
    with pytest.raises(FloatingPointError, match=r"not finite: G_k diverged"):
        _train(settings, 2, data, init_seeds=[10, 11])


def test_kd_batch_cuts_each_step_into_consecutive_kd_steps():
    # Prepare: T=3 steps of B=10 images; with the noise-adapted labels equal to the teacher's,
    # lambda_t plays no role, so kd_batch=5 must equal one step per slice of a (6, 5) trajectory
    trajectories, teacher, _ = _random_epoch(2, steps=3, batch=10)
    chunked = FedBiCrossSettings(weights_mode="uniform", student_lr=0.05, synth_batch=10,
                                 kd_batch=5)
    flat = FedBiCrossSettings(weights_mode="uniform", student_lr=0.05, synth_batch=5)
    reshape = [x.reshape(6, 5, *x.shape[2:]) for x in trajectories]  # step t -> 2t-1, 2t
    reshape_p = [p.reshape(6, 5, p.shape[-1]) for p in teacher]
    # Execute
    students_a, hist_a = _train(chunked, 2, (trajectories, teacher, teacher), init_seeds=[1, 2])
    students_b, _ = _train(flat, 2, (reshape, reshape_p, reshape_p), init_seeds=[1, 2])
    # Assert: six KD updates in both, identical students; history stays one row per step t
    for a, b in zip(students_a, students_b):
        for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(va.float(), vb.float(), atol=1e-6), name
    assert hist_a["weights"].shape == (3, 2, 2)
    with pytest.raises(ValueError, match="divisor"):
        FedBiCrossSettings(synth_batch=10, kd_batch=4)


def test_student_lr_steps_down_at_the_milestones():
    s = FedBiCrossSettings(server_epochs=8, student_lr=1.0, student_lr_milestones="0.5,0.75")
    assert [s.lr_at(e) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert FedBiCrossSettings(server_epochs=1, student_lr=0.3).lr_at(0) == 0.3  # never decays
    constant = FedBiCrossSettings(server_epochs=8, student_lr=1.0, student_lr_milestones="")
    assert {constant.lr_at(e) for e in range(8)} == {1.0}
    for bad in ("0.75,0.5", "0", "1.5", "half", "0.5,,0.75", "0.5,0.5"):
        with pytest.raises(ConfigError, match="student-lr-milestones"):
            FedBiCrossSettings(student_lr_milestones=bad)


def test_hypergradient_stays_exact_where_the_student_rate_steps_down(monkeypatch):
    # Prepare: 2 server epochs, eta_G x0.1 from epoch 2 on; epoch 1 moves the students and fills
    # the momentum buffers, then the first step of epoch 2 is checked.
    settings = FedBiCrossSettings(weights_mode="bilevel", weight_lr=0.1, student_lr=0.5,
                                  server_epochs=2, student_lr_milestones="0.5",
                                  bilevel_val_fraction=0.2, hypergrad_norm="none")
    students = [make_tiny(s, dtype=torch.float64).train() for s in (1, 2)]
    trainer = OnlineBilevelTrainer(students, settings, fixed_weights("bilevel", 2), "cpu")
    first = _random_epoch(2, steps=2, seed=5)
    trainer.run_epoch(*[[x.double() for x in part] for part in first], progress=False, epoch=0)
    second = [[x[:1].double() for x in part] for part in _random_epoch(2, steps=1, seed=6)]
    captured = []
    real_outer = outer_update

    def capture(weights, hypergradient, lr, normalisation):
        captured.append(hypergradient.clone())
        return real_outer(weights, hypergradient, lr, normalisation)

    monkeypatch.setattr("fedbicross_flwr.fedbicross.bilevel.outer_update", capture)
    # Execute: the analytic hypergradient of target 0 at epoch 2's first step ...
    trainer_at = copy.deepcopy(trainer)
    trainer_at.run_epoch(*second, progress=False, epoch=1)
    analytic = captured[0].tolist()
    # ... against central differences of L_val(G'(w)) through the trainer's own step
    eps = 1e-6
    finite_differences = []
    for j in range(2):
        values = []
        for sign in (1, -1):
            twin = copy.deepcopy(trainer)
            twin.weights[0, j] += sign * eps
            values.append(twin.run_epoch(*second, progress=False, epoch=1)["val_loss"][0, 0])
        finite_differences.append((values[0] - values[1]) / (2 * eps))
    # Assert: the step ran at the decayed rate, and Eq. 8 is exact there
    assert trainer_at.lr == pytest.approx(0.05) and trainer.lr == pytest.approx(0.5)
    assert analytic == pytest.approx(finite_differences, rel=1e-5, abs=1e-10)
    assert max(abs(a) for a in analytic) > 1e-8
