"""run_fedbicross end to end on tiny settings, plus the result plots."""

import copy
import csv

import numpy as np
import pytest
import torch

from fedbicross_flwr.distill.plots import save_synthetic_grid
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross
from fedbicross_flwr.fedbicross.plots import plot_weight_history, save_weight_history_csv
from fedbicross_flwr.model import build_resnet18
from tests.tiny_models import make_tiny

TINY = dict(noise_samples=8, synth_steps=3, synth_batch=8, synth_lr=0.1, bn_weight=0.1,
            num_examples=4, kmeans_n_init=2)


def test_end_to_end_with_tiny_resnet18_clients(tmp_path):
    # Prepare: three untrained CIFAR ResNet-18s (different seeds), K = 2
    clients = []
    for seed in range(3):
        torch.manual_seed(seed)
        clients.append(build_resnet18(1, 3))
    before = copy.deepcopy(clients[0].state_dict())
    settings = FedBiCrossSettings(num_clusters=2, **TINY)
    # Execute
    result = run_fedbicross(clients, in_channels=1, num_classes=3, settings=settings, device="cpu",
                            progress=False)
    # Assert: K ResNet-18 state dicts, assignment of length N, weights on the simplex
    reference = build_resnet18(1, 3).state_dict()
    assert len(result.cluster_models) == 2
    for state in result.cluster_models:
        assert state.keys() == reference.keys()
        assert all(state[k].shape == reference[k].shape and state[k].device.type == "cpu" for k in state)
    assert result.assignment.shape == (3,) and set(result.assignment.tolist()) == {0, 1}
    assert result.weight_history.shape == (3, 2, 2)
    assert (result.weight_history >= 0).all() and np.allclose(result.weight_history.sum(axis=2), 1)
    assert [x.shape for x in result.synthetic_examples] == [(4, 1, 28, 28)] * 2
    assert set(result.diagnostics["stage_times_s"]) >= {"clustering", "synthesis", "bilevel"}
    # The cluster models were trained (not the seeded init any more); clients untouched.
    assert not torch.equal(result.cluster_models[0]["conv1.weight"],
                           result.cluster_models[1]["conv1.weight"])
    for name, value in clients[0].state_dict().items():
        assert torch.equal(value, before[name])
    assert clients[0].training
    # Plots of the result
    csv_path = save_weight_history_csv(result.weight_history, tmp_path / "w.csv")
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["step", "target_cluster", "source_cluster", "weight"] and len(rows) == 1 + 3 * 4
    assert plot_weight_history(result.weight_history, tmp_path / "w.png", steps_per_epoch=3).stat().st_size > 0
    grid = save_synthetic_grid(result.synthetic_examples, tmp_path / "grid.png", result.synthetic_labels)
    assert grid.stat().st_size > 0
    # The examples own their storage: synthetic.pt holds them, not the whole trajectory.
    for x in result.synthetic_examples:
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    saved = torch.load(tmp_path / "grid.pt", weights_only=True)["images"]
    assert all(torch.equal(a, b) for a, b in zip(saved, result.synthetic_examples))
    assert (tmp_path / "grid.pt").stat().st_size < 4 * 2 * 4 * 28 * 28 + 4096


def _tiny_run(**overrides):
    clients = [make_tiny(seed) for seed in range(4)]
    settings = FedBiCrossSettings(**{**TINY, "server_epochs": 2, **overrides})
    return run_fedbicross(clients, 1, 3, settings, "cpu", progress=False, image_size=6,
                          student_factory=lambda: make_tiny(99).train())


def test_k1_is_the_without_clustering_ablation():
    result = _tiny_run(num_clusters=1)
    assert result.assignment.tolist() == [0, 0, 0, 0]
    assert np.array_equal(result.weight_history, np.ones((6, 1, 1)))  # 2 epochs x T=3
    assert len(result.cluster_models) == 1


@pytest.mark.parametrize("mode, expected", [("intra", np.eye(2)), ("uniform", np.full((2, 2), 0.5))])
def test_fixed_weight_ablations_keep_their_weights(mode, expected):
    result = _tiny_run(num_clusters=2, weights_mode=mode)
    assert np.array_equal(result.weight_history, np.broadcast_to(expected, (6, 2, 2)))


def test_similarity_ablation_rows_on_simplex_and_fixed():
    result = _tiny_run(num_clusters=2, weights_mode="similarity")
    w = result.weight_history
    assert np.allclose(w.sum(axis=2), 1) and np.allclose(w, w[0])
    assert np.all(np.diag(w[0]) >= w[0].max(axis=1) - 1e-12)  # own cluster most similar


def test_too_many_clusters_raises():
    with pytest.raises(ValueError, match="num_clusters"):
        _tiny_run(num_clusters=5)


def test_bf16_autocast_and_train_mode_noise_teacher_run():
    result = _tiny_run(num_clusters=2, precision="bf16", noise_teacher_mode="train",
                       ensemble="logit", server_epochs=1)
    assert all(torch.isfinite(v.float()).all() for v in result.cluster_models[0].values())
    assert np.isfinite(result.diagnostics["val_loss"]).all()


def test_kd_passes_replay_the_trajectory():
    # Prepare / Execute: one server epoch with one and with two KD passes over its trajectory
    once = _tiny_run(num_clusters=2, server_epochs=1)
    twice = _tiny_run(num_clusters=2, server_epochs=1, kd_passes=2)
    # Assert: 2 x T weight rows; the first pass is exactly the single-pass run (same
    # synthesis, same start); the second pass trains the cluster models further.
    assert twice.weight_history.shape == (6, 2, 2)
    assert np.array_equal(twice.weight_history[:3], once.weight_history)
    assert not torch.equal(twice.cluster_models[0]["fc.weight"], once.cluster_models[0]["fc.weight"])


def test_carried_noise_teacher_continues_eq3_from_the_previous_epoch():
    # Prepare: two members of one cluster, T = 3 steps, no EMA cutoff, so Eq. 3 unrolled is
    # beta^T * start + sum_t (1 - beta) beta^(t-1) stat(x^(t)): the carried and the fresh
    # teacher of epoch 2 differ by exactly beta^T * (epoch 1's adapted - original statistics).
    from fedbicross_flwr.fedbicross.method import _synthesize_cluster

    members = [make_tiny(s).to(torch.float64) for s in (3, 4)]
    settings = FedBiCrossSettings(num_clusters=1, synth_steps=3, synth_batch=6, synth_lr=0.1,
                                  bn_weight=0.1, noise_ema_cutoff=0.0, noise_teacher_carry=True,
                                  server_epochs=2)
    # Execute
    first = _synthesize_cluster(members, settings, 3, 1, 6, 0, 0, torch.device("cpu"), False)
    carried = _synthesize_cluster(members, settings, 3, 1, 6, 1, 0, torch.device("cpu"), False,
                                  None, first["noise_buffers"])
    fresh = _synthesize_cluster(members, settings, 3, 1, 6, 1, 0, torch.device("cpu"), False)
    # Assert
    beta_t = 0.9 ** 3
    for m, member in enumerate(members):
        for stat in ("bn.running_mean", "bn.running_var"):
            original = member.state_dict()[stat]
            expected = beta_t * (first["noise_buffers"][m][stat] - original)
            got = carried["noise_buffers"][m][stat] - fresh["noise_buffers"][m][stat]
            assert torch.allclose(got, expected, atol=1e-10), stat
            assert expected.abs().max() > 1e-3  # the carry made a difference here
    # Same trajectory (the seed is the epoch's), different noise teacher soft labels
    assert torch.equal(carried["trajectory"], fresh["trajectory"])
    assert not torch.allclose(carried["noise_probs"], fresh["noise_probs"])
    assert torch.equal(carried["teacher_probs"], fresh["teacher_probs"])


def test_two_epoch_run_with_carried_train_mode_teacher_and_lr_steps(tmp_path):
    # A whole run with the reference's choices: carried, train-mode noise teacher, eta_G
    # stepping down after the first epoch; the epoch checkpoint keeps the carried teacher.
    clients = [make_tiny(s) for s in range(3)]
    settings = FedBiCrossSettings(num_clusters=2, server_epochs=2, noise_teacher_carry=True,
                                  noise_teacher_mode="train", student_lr_milestones="0.5",
                                  **TINY)
    result = run_fedbicross(clients, 1, 3, settings, "cpu", progress=False, image_size=6,
                            student_factory=lambda: make_tiny(9), checkpoint_dir=tmp_path)
    assert result.weight_history.shape == (6, 2, 2)
    saved = torch.load(next(tmp_path.rglob("epoch1-bilevel.pt")), weights_only=False)
    assert len(saved["noise_teachers"]) == 2
    assert sorted(len(c) for c in saved["noise_teachers"]) == [1, 2]
