"""Multi-round references (fedavg-r, fedprox-r) through the real apps and the direct runner.

Every other Flower strategy: tests/test_flower_strategies.py.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAvg

import client_app.app as client_module
from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.methods.flower_strategies import build_strategy
from fedbicross_flwr.methods.rounds import round_config, round_epochs
from fedbicross_flwr.model import float_state, initial_state
from fedbicross_flwr.runners.direct import run_direct_methods
from fedbicross_flwr.runners.inprocess import run_in_process
from fedbicross_flwr.training import proximal_term
from fedbicross_flwr.transports.direct import DirectTransport


def _np_state(message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in message.content["arrays"].items()}


def _hand_average(replies) -> dict[str, np.ndarray]:
    """sum_i n_i w_i / sum_i n_i per tensor, in float64 (the FedAvg rule written out)."""
    n = [float(r.content["metrics"]["num-examples"]) for r in replies]
    states = [_np_state(r) for r in replies]
    return {k: sum(ni * s[k].astype(np.float64) for ni, s in zip(n, states)) / sum(n)
            for k in states[0]}


def _assert_state_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The floating-point entries agree; BatchNorm's step counters, which the rounds do not
    carry, stay at w^(0)'s 0 where present.
    """
    floats = {k for k in got if not np.issubdtype(got[k].dtype, np.integer)}
    assert floats == want.keys()
    for k in got:
        if k in floats:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            assert got[k] == 0, k


def test_two_rounds_send_the_weighted_average_of_round_two(tiny_run_config,
                                                           monkeypatch) -> None:
    # Prepare: R=2 rounds of 1 epoch (local-epochs=2 split over 2 rounds), FedProx; record
    # what the ClientApp passes to the local training
    calls = []
    real = client_module.run_local_training

    def recording(cfg, site, device, init=None, **kwargs):
        calls.append(kwargs)
        return real(cfg, site, device, init, **kwargs)

    monkeypatch.setattr(client_module, "run_local_training", recording)
    rc = {**tiny_run_config, "method": "fedprox-r", "rounds": 2, "local-epochs": 2, "model-width": 8,
          "proximal-mu": 0.25}
    # Execute: the real ServerApp and ClientApp over the in-process Grid
    grid, run_dir = run_in_process(rc, num_nodes=3)
    # Assert: 3 train messages per round, then 3 personalize messages
    train_sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    train_replies = [m for m in grid.replies if m.metadata.message_type == "train"]
    pers_sent = [m for m in grid.sent if m.metadata.message_type == "train.personalize"]
    assert len(train_sent) == len(train_replies) == 6 and len(pers_sent) == 3
    round1, round2 = train_replies[:3], train_replies[3:]
    # round configs as Flower's FedProx sends them, plus the round's local epochs; the
    # clients train with exactly these values
    assert [int(m.content["config"]["server-round"]) for m in train_sent] == [1] * 3 + [2] * 3
    assert all(int(m.content["config"]["local-epochs"]) == 1 for m in train_sent)
    assert all(float(m.content["config"]["proximal-mu"]) == 0.25 for m in train_sent)
    assert [(c["epochs"], c["proximal_mu"], c["server_round"]) for c in calls] == (
        [(1, 0.25, 1)] * 3 + [(1, 0.25, 2)] * 3)
    # the rounds carry the floating-point arrays only, both ways
    assert all("bn1.num_batches_tracked" not in m.content["arrays"] for m in train_sent
               + train_replies)
    # round 2 starts from the hand-computed average of round 1
    _assert_state_close(_np_state(train_sent[3]), _hand_average(round1))
    # every client receives the hand-computed average of the round-2 models
    want = _hand_average(round2)
    for m in pers_sent:
        _assert_state_close(_np_state(m), want)
    # ... which is also what Flower's own FedAvg aggregation gives (float32 arithmetic)
    flower_avg, _ = FedAvg().aggregate_train(2, round2)
    _assert_state_close({k: v.numpy() for k, v in flower_avg.items()}, want)
    # per-round log
    with (run_dir / "rounds.csv").open() as fh:
        rounds = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rounds] == [1, 2]
    assert all(int(r["clients"]) == 3 for r in rounds)


def test_both_engines_give_the_same_numbers(tiny_run_config) -> None:
    # Prepare
    rc = {**tiny_run_config, "method": "fedavg-r", "rounds": 2, "local-epochs": 2, "model-width": 8}
    # Execute: Flower Grid (strategy-configured rounds) and the Flower-free direct runner
    _, grid_dir = run_in_process(rc, num_nodes=3)
    direct_dir = run_direct_methods(RunConfig.from_run_config({**rc, "run-name": "direct"}),
                                    ["fedavg-r"])["fedavg-r"]

    def rows(d: Path) -> list[dict]:
        with (d / "clients.csv").open() as fh:
            return list(csv.DictReader(fh))

    # Assert: same per-client accuracies, before and after personalization, both views
    cost = ("train-seconds", "bytes-up", "bytes-down")
    grid_rows, direct_rows = rows(grid_dir), rows(direct_dir)
    assert ([{k: v for k, v in r.items() if k not in cost} for r in grid_rows]
            == [{k: v for k, v in r.items() if k not in cost} for r in direct_rows])
    # Assert: the bytes measured on the Flower messages match the arrays' formula (direct
    # engine) to within the messages' framing: 2 rounds + personalization, each way
    for g, d in zip(grid_rows, direct_rows):
        for key in ("bytes-up", "bytes-down"):
            measured, formula = int(g[key]), int(d[key])
            assert abs(measured - formula) <= 0.01 * formula + 3 * 64 * 1024, (key, g, d)
        # 3 models down, 2 up; the rounds' models come without the BatchNorm step counters,
        # which only the personalization model carries
        counters = sum(t.numel() * t.element_size() for t in initial_state(
            RunConfig.from_run_config(rc), 1, 3).values() if not t.is_floating_point())
        assert counters == 20 * 8  # 20 BatchNorm layers, one int64 each
        assert int(d["bytes-down"]) == 3 * int(d["bytes-up"]) // 2 + counters
    summary = json.loads((grid_dir / "summary.json").read_text())["cost"]
    assert summary["model-exchanges"] == 3 and summary["bytes-counted-from"] == "flower messages"
    assert summary["bytes-down-per-client"] == pytest.approx(
        sum(int(g["bytes-down"]) for g in grid_rows) / len(grid_rows))


def test_one_shot_method_after_multiround_keeps_phase_one_models(tiny_run_config) -> None:
    # Prepare: one transport serving phase 1, then a multi-round method, then phase 1 again
    cfg = RunConfig.from_run_config(tiny_run_config)
    transport = DirectTransport(cfg)
    init = initial_state(cfg, 1, 3)
    transport.collect_models(cfg, init)
    phase1_models = dict(transport.own_models)
    # Execute
    rounds_cfg = cfg.replace(method="fedavg-r", rounds=1)
    transport.train_round(rounds_cfg, build_strategy(rounds_cfg, 3), float_state(init), 1,
                          round_config(rounds_cfg))
    used_by_rounds = transport.active_own
    transport.collect_models(cfg, init)  # the next one-shot method (cached uploads)
    # Assert: the rounds' personalization uses the round models, a later one-shot method
    # the phase-1 models again
    assert set(used_by_rounds) == {0, 1, 2}
    assert all(used_by_rounds[p] is not phase1_models[p] for p in phase1_models)
    assert transport.active_own == phase1_models
    assert all(transport.active_own[p] is phase1_models[p] for p in phase1_models)


def test_round_epochs_default_matches_one_shot_compute() -> None:
    assert round_epochs(RunConfig(local_epochs=20, rounds=10)) == 2
    assert round_epochs(RunConfig(local_epochs=20, rounds=3)) == 7  # ceil
    assert round_epochs(RunConfig(local_epochs=20, rounds=3, round_epochs=1)) == 1
    # FedProx's mu is the proximal-mu key; plain FedAvg sends none
    assert build_strategy(RunConfig(method="fedprox-r", proximal_mu=0.5), 3).proximal_mu == 0.5
    assert not hasattr(build_strategy(RunConfig(method="fedavg-r", proximal_mu=0.5), 3),
                       "proximal_mu")
    with pytest.raises(ConfigError, match="'rounds'"):
        RunConfig.from_run_config({"rounds": 0})
    with pytest.raises(ConfigError, match="'proximal-mu'"):
        RunConfig.from_run_config({"proximal-mu": -1.0})


def test_proximal_term_value_and_effect() -> None:
    # Prepare: hand-computed value: mu/2 * (1^2 + 2^2 + 2^2) = 0.5 * 0.5 * 9
    p = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    a = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert float(proximal_term(p, a, 0.5)) == pytest.approx(2.25)
    # Effect: with a large mu the trained weights stay closer to where they started
    from fedbicross_flwr.training import SGDSettings, train_local

    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 3
    dist = {}
    for mu in (0.0, 5.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        start = [q.detach().clone() for q in model.parameters()]
        train_local(model, x, y, SGDSettings(3, 0.1, 0.0, 0.0, 8, 0), torch.device("cpu"),
                    progress=False, proximal_mu=mu)
        dist[mu] = math.sqrt(sum(float(((q.detach() - s) ** 2).sum())
                                 for q, s in zip(model.parameters(), start)))
    assert dist[5.0] < 0.5 * dist[0.0]


def _client_rows(run_dir: Path) -> list[dict]:
    """``clients.csv`` without the cost columns (timings and bytes differ between runs)."""
    with (run_dir / "clients.csv").open() as fh:
        return [{k: v for k, v in r.items()
                 if k not in ("train-seconds", "bytes-up", "bytes-down")}
                for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def several_strategies(tmp_path_factory):
    """``methods = fedadam-r,krum-r,fedavg1`` through the real apps on the in-process Grid
    (FedAdam with its own server rate), and each multi-round method alone (direct engine).
    """
    from tests.conftest import make_archive

    tmp = tmp_path_factory.mktemp("several")
    rc = {"dataset": "custom", "data-path": str(make_archive(tmp / "tiny.npz")),
          "in-channels": 1, "num-classes": 3, "num-clients": 3, "alpha": 1.0,
          "min-partition-size": 5, "local-epochs": 2, "pers-epochs": 1, "batch-size": 16,
          "local-lr": 0.01, "output-dir": str(tmp / "runs"), "progress": False,
          "node-wait-timeout": 0.0, "model-width": 8, "rounds": 2}
    _, comparison = run_in_process({**rc, "run-name": "all", "methods": "fedadam-r,krum-r,fedavg1",
                                    "strategy-args": "fedadam-r:eta=0.05"}, num_nodes=3)
    args = {"fedadam-r": "eta=0.05", "krum-r": "", "fedavg1": ""}
    alone = {m: run_direct_methods(RunConfig.from_run_config(
        {**rc, "method": m, "run-name": f"alone-{m}", "strategy-args": a}), [m])[m]
        for m, a in args.items()}
    return comparison, alone


def test_methods_compare_several_multi_round_strategies_in_one_table(several_strategies):
    comparison, _ = several_strategies
    # Assert: one run folder per method, the table in the order the methods were listed
    with (comparison / "comparison.csv").open() as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["fedadam-r", "krum-r", "fedavg1"]
    runs = comparison.parent
    configs = {m: json.loads((runs / f"all-{m}" / "run_config.json").read_text())
               for m in ("fedadam-r", "krum-r", "fedavg1")}
    assert {m: c["strategy-args"] for m, c in configs.items()} == {
        "fedadam-r": "eta=0.05", "krum-r": "", "fedavg1": ""}
    diagnostics = {m: json.loads((runs / f"all-{m}" / "summary.json").read_text())[
        "method-diagnostics"] for m in ("fedadam-r", "krum-r")}
    assert [diagnostics[m]["strategy"] for m in diagnostics] == ["FedAdam", "Krum"]
    # Assert: both multi-round methods ran their 2 rounds on every client
    for m in ("fedadam-r", "krum-r"):
        with (runs / f"all-{m}" / "rounds.csv").open() as fh:
            assert [int(r["clients"]) for r in csv.DictReader(fh)] == [3, 3]


def test_each_multi_round_strategy_starts_from_the_same_model_as_alone(several_strategies):
    comparison, alone = several_strategies
    runs = comparison.parent
    # Assert: every method gives the numbers it gives alone (direct engine): a multi-round
    # method after another (whose rounds retrained the clients) starts from the same w^(0)
    # on the same partition and personalizes with its own last round's f_i (the Grid's node
    # state); the one-shot method, listed last, still personalizes with phase 1's f_i
    for m in ("fedadam-r", "krum-r", "fedavg1"):
        assert _client_rows(runs / f"all-{m}") == _client_rows(alone[m]), m


def test_run_order_puts_the_multi_round_methods_last_as_listed() -> None:
    from fedbicross_flwr.server import run_order

    assert run_order(["fedadam-r", "krum-r", "fedavg1", "local"]) == \
        ["fedavg1", "local", "fedadam-r", "krum-r"]
    assert RunConfig(methods="fedadam-r,krum-r,fedavg1").method_list == \
        ["fedadam-r", "krum-r", "fedavg1"]
