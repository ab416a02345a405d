"""Flower's own strategies as multi-round reference rows (fedbicross_flwr.methods.flower_strategies).

Every strategy runs 2 rounds through the real ClientApp on the in-process Flower Grid and on
the direct engine, with the same per-client numbers; one robust strategy is checked against a
coordinate-wise median computed here, a DP wrapper's noise against its configured scale, and
the arguments against the strategy's signature.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.methods.catalog import method_names
from fedbicross_flwr.methods.flower_strategies import (
    FLOWER_STRATEGIES,
    build_strategy,
    parse_strategy_args,
)
from fedbicross_flwr.methods.rounds import _aggregate
from fedbicross_flwr.model import build_resnet18, float_state, probe_for
from fedbicross_flwr.protocol import ClientReply
from fedbicross_flwr.runners.direct import run_direct_methods
from fedbicross_flwr.runners.inprocess import run_in_process
from fedbicross_flwr.transports.direct import _SiteNodes

# A DP wrapper's noise must leave BatchNorm's running variances positive on this tiny model
STRATEGY_ARGS = {"dp-fixed-server-r": "noise_multiplier=0.001 clipping_norm=10.0",
                 "dp-fixed-client-r": "noise_multiplier=0.001 clipping_norm=10.0",
                 "dp-adaptive-server-r": "noise_multiplier=0.001 initial_clipping_norm=10.0",
                 "dp-adaptive-client-r": "noise_multiplier=0.001 initial_clipping_norm=10.0"}


def _rows(run_dir: Path) -> list[dict]:
    cost = ("train-seconds", "bytes-up", "bytes-down")
    with (run_dir / "clients.csv").open() as fh:
        return [{k: v for k, v in r.items() if k not in cost} for r in csv.DictReader(fh)]


def test_the_catalog_offers_every_applicable_flower_strategy() -> None:
    import flwr.serverapp.strategy as flower

    offered = {e.cls for e in FLOWER_STRATEGIES}
    # every strategy class Flower exports, less the XGBoost ones (trees, not arrays) and the
    # abstract bases
    exported = {name for name in flower.__all__
                if isinstance(getattr(flower, name), type) and "Xgb" not in name
                and name not in ("Strategy", "FedOpt", "Result")}
    assert offered == exported
    assert set(method_names(kind="multi-round")) == {e.method for e in FLOWER_STRATEGIES}


@pytest.mark.parametrize("entry", FLOWER_STRATEGIES, ids=lambda e: e.method)
def test_every_strategy_gives_the_same_numbers_in_both_engines(entry, tiny_run_config) -> None:
    # Prepare: 2 rounds of 1 epoch at width 8
    rc = {**tiny_run_config, "method": entry.method, "rounds": 2, "local-epochs": 2,
          "model-width": 8, "strategy-args": STRATEGY_ARGS.get(entry.method, "")}
    # Execute: the real ServerApp + ClientApp over the in-process Grid, and the direct engine
    grid, grid_dir = run_in_process(rc, num_nodes=3)
    direct_dir = run_direct_methods(RunConfig.from_run_config({**rc, "run-name": "direct"}),
                                    [entry.method])[entry.method]
    # Assert: every client trained both rounds and personalized; same per-client numbers
    trains = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert len(trains) == 6 and not any(m.has_error() for m in trains)
    grid_rows = _rows(grid_dir)
    assert len(grid_rows) == 3 and all(r["status"] == "ok" for r in grid_rows), grid_rows
    assert grid_rows == _rows(direct_dir)
    if entry.client_clipping == "adaptive":  # Flower's mod ran at the sites
        assert all("norm_bit" in m.content["metrics"] for m in trains)


def _replies(seed: int, n: int, init: dict[str, torch.Tensor]) -> dict[int, ClientReply]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for pid in range(n):
        state = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)
                     if v.is_floating_point() else v) for k, v in init.items()}
        for k in state:
            if k.endswith("running_var"):
                state[k] = state[k].abs() + 0.5
        out[pid] = ClientReply(pid, state, {"num-examples": 10.0 + pid, "train-loss": 1.0})
    return out


def test_fedmedian_is_the_coordinate_wise_median(tiny_run_config) -> None:
    # Prepare: 5 client models around w^(0)
    cfg = RunConfig.from_run_config({**tiny_run_config, "method": "fedmedian-r"})
    init = build_resnet18(1, 3, 8).state_dict()
    replies = _replies(0, 5, init)
    strategy = build_strategy(cfg, 5)
    strategy.configure_train(1, ArrayRecord(float_state(init)), ConfigRecord({}),
                             _SiteNodes([1, 2, 3, 4, 5]))
    # Execute
    got = _aggregate(strategy, 1, replies, init, probe_for(init))
    # Assert: the median of the 5 values of every coordinate, computed here; counters of w^(0)
    for k, v in init.items():
        if v.is_floating_point():
            want = torch.stack([r.state[k] for r in replies.values()]).median(dim=0).values
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-7)
        else:
            assert torch.equal(got[k], v), k


def test_dp_wrapper_adds_noise_of_the_configured_scale(tiny_run_config) -> None:
    # Prepare: server-side fixed clipping; every client sends w^(0) + 1e-5 (an update far
    # inside the clipping norm; Flower divides by the update's norm, so not zero), so the
    # aggregate minus w^(0) is 1e-5 plus the noise
    noise, clip, n = 0.5, 0.2, 4
    cfg = RunConfig.from_run_config({
        **tiny_run_config, "method": "dp-fixed-server-r",
        "strategy-args": f"noise_multiplier={noise} clipping_norm={clip}"})
    init = build_resnet18(1, 3, 8).state_dict()
    strategy = build_strategy(cfg, n)
    messages = list(strategy.configure_train(1, ArrayRecord(float_state(init)),
                                             ConfigRecord({}), _SiteNodes([1, 2, 3, 4])))
    assert len(messages) == n
    from flwr.app import Message, MetricRecord, RecordDict

    shifted = {k: v + 1e-5 for k, v in float_state(init).items()}
    replies = [Message(RecordDict({"arrays": ArrayRecord(shifted),
                                   "metrics": MetricRecord({"num-examples": 10.0})}),
                       reply_to=m) for m in messages]
    np.random.seed(0)
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: Gaussian noise of std noise * clip / n on every coordinate (Flower's formula)
    got = arrays.to_torch_state_dict()
    diff = torch.cat([(got[k].double() - v.double()).flatten()
                      for k, v in float_state(init).items()])
    want = noise * clip / n
    assert diff.numel() > 50_000
    assert float(diff.std()) == pytest.approx(want, rel=0.02)
    assert abs(float(diff.mean()) - 1e-5) < 5 * want / math.sqrt(diff.numel())


def test_the_round_messages_carry_what_the_strategy_configured(tiny_run_config) -> None:
    # Prepare: client-side DP with FedAdam's learning rate set; 1 round
    rc = {**tiny_run_config, "method": "dp-fixed-client-r", "rounds": 1, "model-width": 8,
          "strategy-args": "noise_multiplier=0.001 clipping_norm=7.5"}
    # Execute
    grid, _ = run_in_process(rc, num_nodes=3)
    # Assert: Flower's wrapper sent the clipping norm, the server the mod to apply; the
    # sites' updates were clipped to it (norm of reply - sent <= 7.5)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    replies = {m.metadata.src_node_id: m for m in grid.replies
               if m.metadata.message_type == "train"}
    for m in sent:
        config = m.content["config"]
        assert config["clipping_norm"] == 7.5 and config["dp-clipping"] == "fixed"
        a, b = m.content["arrays"], replies[m.metadata.dst_node_id].content["arrays"]
        update = math.sqrt(sum(float(((b[k].numpy().astype(np.float64)
                                       - a[k].numpy()) ** 2).sum()) for k in a))
        assert update <= 7.5 + 1e-4


@pytest.mark.parametrize(("method", "args", "match"), [
    ("fedadam-r", "etaa=0.1", r"FedAdam takes no argument 'etaa'; it takes \[.*'eta'"),
    ("fedadam-r", "eta='fast'", r"FedAdam's eta: 'fast' is a str, it takes float"),
    ("krum-r", "num_malicious_nodes=0.5", r"Krum's num_malicious_nodes: 0.5 is a float"),
    ("fedprox-r", "proximal_mu=0.1", r"proximal_mu is set by the protocol .*set proximal-mu"),
    ("fedavg-r", "fraction_train=0.5", r"fraction_train is set by the protocol"),
    ("fedavg-r", "eta", r"'eta' is not name=value"),
    ("fedavg-r", "eta=[1,2]", r"is not a number, true/false or a quoted string"),
    ("dp-fixed-server-r", "noise_multiplier=-1.0", r"noise multiplier should be a non-neg"),
    ("fedbicross", "", r"'fedbicross' is not one of Flower's strategies"),
])
def test_strategy_arguments_are_checked_against_the_signature(method, args, match) -> None:
    cfg = RunConfig(method=method, strategy_args=args)
    with pytest.raises(ConfigError, match=match):
        build_strategy(cfg, 3)


def test_strategy_args_parse_toml_literals() -> None:
    assert parse_strategy_args("eta=0.01, beta_1=0.9 tau=1e-9 x=true s='a'") == {
        "eta": 0.01, "beta_1": 0.9, "tau": 1e-9, "x": True, "s": "a"}
    strategy = build_strategy(RunConfig(method="fedadam-r", strategy_args="eta=0.05"), 3)
    assert strategy.eta == 0.05 and strategy.min_train_nodes == 3


def test_an_unusable_aggregate_stops_the_run_in_one_line(tiny_run_config, tmp_path,
                                                         capsys) -> None:
    # Prepare: DP noise far above the model's scale (std 50 x 1 / 3 on every coordinate)
    import tomli_w

    from fedbicross_flwr.cli import main

    preset = tmp_path / "dp.toml"
    preset.write_text(tomli_w.dumps({**tiny_run_config, "method": "dp-fixed-server-r",
                                     "rounds": 2, "model-width": 8,
                                     "strategy-args": "noise_multiplier=50.0"}))
    # Execute
    code = main(["run", "--preset", str(preset)])
    # Assert: one line naming the round, the strategy, the tensor and what to lower
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err
    assert "round 1: DifferentialPrivacyServerSideFixedClipping's aggregate is not a usable " \
           "model" in err and "lower them in strategy-args" in err


def test_strategy_args_belong_to_the_multi_round_method_of_a_comparison() -> None:
    # Prepare: a comparison of one-shot methods and one multi-round method, with its arguments
    cfg = RunConfig(methods="fedavg1,local,fedadam-r", strategy_args="eta=0.05")
    # Execute / Assert: each method's own config keeps them only for the method that uses them
    assert cfg.for_method("fedadam-r", "x-fedadam-r").strategy_args == "eta=0.05"
    for method in ("fedavg1", "local"):
        one = cfg.for_method(method, f"x-{method}")
        assert (one.method, one.methods, one.strategy_args) == (method, "", "")
    # ... and a method alone that does not use them refuses them, naming it
    with pytest.raises(ConfigError, match="method 'fedavg1' takes no strategy arguments"):
        RunConfig(method="fedavg1", strategy_args="eta=")


def test_a_qualified_strategy_arg_belongs_to_its_method_alone() -> None:
    # Prepare: two multi-round methods; eta qualified for each, tau for both
    cfg = RunConfig(methods="fedadam-r,fedyogi-r,local",
                    strategy_args="fedadam-r:eta=0.05, tau=1e-3 fedyogi-r:eta=0.02")
    # Execute / Assert: each method's config holds its own pairs, unqualified
    assert cfg.for_method("fedadam-r", "x").strategy_args == "eta=0.05 tau=1e-3"
    assert cfg.for_method("fedyogi-r", "x").strategy_args == "tau=1e-3 eta=0.02"
    assert cfg.for_method("local", "x").strategy_args == ""
    # ... and the strategies are built with them, from the run's config as from each one's
    adam = build_strategy(cfg.replace(method="fedadam-r"), 3)
    yogi = build_strategy(cfg.for_method("fedyogi-r", "x"), 3)
    assert (adam.eta, adam.tau, yogi.eta, yogi.tau) == (0.05, 1e-3, 0.02, 1e-3)
    # Assert: a pair unqualified that one of the methods does not take stops the run before
    # any training, naming the method and the way to qualify it
    from fedbicross_flwr.config.run_config import check_strategy_args

    with pytest.raises(ConfigError, match=r"^fedavgm-r: strategy-args: FedAvgM takes no "
                                          r"argument 'eta'.*'fedadam-r:eta=0.05'"):
        check_strategy_args(RunConfig(methods="fedadam-r,fedavgm-r", strategy_args="eta=0.05"))
    # Assert: a pair qualified with a method that is not a multi-round method of the run
    with pytest.raises(ConfigError, match="qualifies a pair with 'krum-r'"):
        RunConfig(methods="fedadam-r,local", strategy_args="krum-r:num_malicious_nodes=1")

