"""The one-shot strategies (fedbicross_flwr.strategies) on an in-process Flower Grid.

FedBiCross's strategy and the project's ServerApp (``run_server`` over the apps engine) run on
the same real ClientApp, the same partition and the same settings (tiny archive, width 4,
T = 2, B = 8): they must send the same instructions, get the same uploads, and give the same
cluster assignment, cross-cluster weight history and received models. The other tests check
the construction (defaults are the settings classes', values are checked) and the reply
checks (a refused upload is left out with its reason).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from client_app.app import app as client_app
from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.methods.catalog import method_names
from fedbicross_flwr.model import initial_state, weighted_average
from fedbicross_flwr.protocol import RETURN_MODEL
from fedbicross_flwr.runners.inprocess import InProcessGrid, run_in_process
from fedbicross_flwr.strategies import (
    DAFL,
    DENSE,
    STRATEGIES,
    ClusterFedAvg,
    CoBoosting,
    FedAvgOneShot,
    FedBiCross,
    FedISCA,
    strategy_for,
)
from tests.conftest import make_archive

NODES = 3
TINY = {"model-width": 4, "synth-steps": 2, "synth-batch": 8, "noise-samples": 16,
        "num-clusters": 2, "server-epochs": 1, "seed": 1}


def _tiny_run_config(tmp: Path) -> dict:
    return {"dataset": "custom", "data-path": str(make_archive(tmp / "site.npz")),
            "in-channels": 1, "num-classes": 3, "num-clients": NODES, "alpha": 1.0,
            "min-partition-size": 5, "local-epochs": 1, "pers-epochs": 1, "batch-size": 16,
            "local-lr": 0.01, "output-dir": str(tmp / "runs"), "run-name": "today",
            "progress": False, "node-wait-timeout": 0.0, **TINY}


def _sent(grid: InProcessGrid, message_type: str) -> list[Message]:
    return sorted((m for m in grid.sent if m.metadata.message_type == message_type),
                  key=lambda m: m.metadata.dst_node_id)


def _states(messages: list[Message]) -> dict[int, dict[str, torch.Tensor]]:
    """Partition -> the arrays of its message (an instruction, or a train reply)."""
    return {int(m.content["config"]["partition-id"]): m.content["arrays"].to_torch_state_dict()
            for m in messages if "arrays" in m.content}


def _same_states(a: dict[int, dict], b: dict[int, dict]) -> bool:
    return a.keys() == b.keys() and all(
        a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) for k in a[p])
        for p in a)


def _clusters(path: Path) -> dict[int, int]:
    with path.open() as fh:
        return {int(r["partition-id"]): int(r["cluster"]) for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory):
    """Today's path (the ServerApp's ``run_server``) and the strategy, on the same setup."""
    tmp = tmp_path_factory.mktemp("paths")
    run_config = _tiny_run_config(tmp)
    # Today's path: the project's ServerApp over the in-process grid
    grid_a, run_dir = run_in_process({**run_config, "method": "fedbicross"}, num_nodes=NODES)
    # The strategy: a fresh grid (same seed: same node ids), the same ClientApp and run config
    grid_b = InProcessGrid(client_app, run_config, NODES)
    cfg = RunConfig.from_run_config(run_config)
    init = initial_state(cfg, 1, 3)  # w^(0) as the ServerApp makes it
    calls: list[int] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        calls.append(server_round)
        return MetricRecord({"fc-bias-sum": float(arrays.to_torch_state_dict()["fc.bias"].sum())})

    strategy = FedBiCross(num_clusters=2, noise_samples=16, synth_steps=2, synth_batch=8,
                          server_epochs=1, seed=cfg.seed, progress=False,
                          min_available_nodes=NODES, min_train_nodes=NODES,
                          output_dir=tmp / "strategy")
    result = strategy.start(grid=grid_b, initial_arrays=ArrayRecord(init),
                            evaluate_fn=evaluate_fn)
    return {"grid_a": grid_a, "run_dir": run_dir, "grid_b": grid_b, "strategy": strategy,
            "result": result, "calls": calls, "init": init, "tmp": tmp}


def test_the_strategy_sends_the_servers_instructions_and_gets_the_same_uploads(both_paths):
    grid_a, grid_b = both_paths["grid_a"], both_paths["grid_b"]
    # Assert: one train instruction per node, same config (partition bound by the server)
    train_a, train_b = _sent(grid_a, "train"), _sent(grid_b, "train")
    assert [m.metadata.dst_node_id for m in train_a] == [m.metadata.dst_node_id for m in train_b]
    assert [dict(m.content["config"]) for m in train_a] == \
        [dict(m.content["config"]) for m in train_b] == \
        [{"phase": "train", "partition-id": p, "num-partitions": NODES} for p in range(NODES)]
    assert _same_states(_states(train_a), _states(train_b))  # the same w^(0), BN counters too
    # Assert: the clients uploaded the same models (the comparison below is on equal inputs)
    uploads_a = _states([r for r in grid_a.replies if r.metadata.message_type == "train"])
    uploads_b = _states([r for r in grid_b.replies if r.metadata.message_type == "train"])
    assert len(uploads_a) == NODES and _same_states(uploads_a, uploads_b)


def test_the_strategy_gives_todays_clusters_weights_and_received_models(both_paths):
    run_dir, strategy = both_paths["run_dir"], both_paths["strategy"]
    out_b = both_paths["tmp"] / "strategy"
    # Assert: the same cluster assignment (file and attribute) and weight history
    assert _clusters(out_b / "clusters.csv") == _clusters(run_dir / "clusters.csv") \
        == strategy.clusters
    assert sorted(set(strategy.clusters.values())) == [0, 1]  # K = 2 used, not collapsed
    weights = (out_b / "weights.csv").read_text()
    assert weights == (run_dir / "weights.csv").read_text() and len(weights.splitlines()) > 2
    # Assert: each node received the same model, as a train.personalize message
    pers_a = _sent(both_paths["grid_a"], "train.personalize")
    pers_b = _sent(both_paths["grid_b"], "train.personalize")
    # ... the project's simulation also asks for the personalized model, to score it itself
    # (reports/scoring.py); a user's ServerApp holds no test data and does not ask
    assert all(m.content["config"][RETURN_MODEL] for m in pers_a)
    assert [{k: v for k, v in m.content["config"].items() if k != RETURN_MODEL}
            for m in pers_a] == [dict(m.content["config"]) for m in pers_b]
    received_a, received_b = _states(pers_a), _states(pers_b)
    assert len(received_b) == NODES and _same_states(received_a, received_b)
    assert _same_states(received_b, strategy.models)
    assert not (out_b / "checkpoints").exists()  # nothing left to resume from
    # Assert: the sites' personalization replies carry a model only where it was asked for
    replies_a = [r for r in both_paths["grid_a"].replies
                 if r.metadata.message_type == "train.personalize"]
    replies_b = [r for r in both_paths["grid_b"].replies
                 if r.metadata.message_type == "train.personalize"]
    assert len(replies_a) == len(replies_b) == NODES
    assert all("arrays" in r.content.keys() for r in replies_a)
    assert not any("arrays" in r.content.keys() for r in replies_b)


def test_the_result_holds_the_personalization_and_server_evaluation(both_paths):
    result, strategy = both_paths["result"], both_paths["strategy"]
    with (both_paths["run_dir"] / "clients.csv").open() as fh:
        rows = {int(r["partition-id"]): r for r in csv.DictReader(fh)}
    # Assert: round 1's metrics: every upload used, their mean local accuracy
    train = result.train_metrics_clientapp[1]
    assert (train["num-uploads"], train["num-failures"]) == (NODES, 0)
    assert train["test-acc"] == pytest.approx(
        sum(float(r["local-test-acc"]) for r in rows.values()) / NODES)
    # Assert: the personalization round's means are today's clients' (before and after)
    evaluation = result.evaluate_metrics_clientapp[1]
    assert evaluation["num-clients"] == NODES
    for key in ("acc-before", "acc-after"):
        assert evaluation[key] == pytest.approx(
            sum(float(r[key]) for r in rows.values()) / NODES)
        assert evaluation[key] == pytest.approx(
            sum(m[key] for m in strategy.client_metrics.values()) / NODES)
    # Assert: two clusters' models: no global model; evaluate_fn on w^(0), then once per model
    assert len(result.arrays) == 0
    assert both_paths["calls"] == [0, 1, 1]
    per_client = [float(sum(strategy.models[p]["fc.bias"])) for p in range(NODES)]
    assert result.evaluate_metrics_serverapp[1]["fc-bias-sum"] == \
        pytest.approx(sum(per_client) / NODES)
    assert result.evaluate_metrics_serverapp[0]["fc-bias-sum"] == \
        pytest.approx(float(both_paths["init"]["fc.bias"].sum()))
    assert strategy.failures == []


def _poisoned_upload(msg: Message, ctx: Context, call):
    """Node 1 uploads a model whose BatchNorm variance is negative; honest otherwise."""
    reply = call(msg, ctx)
    if msg.metadata.message_type != "train":
        return reply
    state = reply.content["arrays"].to_torch_state_dict()
    state["bn1.running_var"].fill_(-1.0)
    return Message(RecordDict({"arrays": ArrayRecord(state),
                               "metrics": reply.content["metrics"],
                               "config": reply.content["config"]}), reply_to=msg)


def test_a_refused_upload_is_left_out_with_its_reason_and_fedavg1_averages_the_rest(tmp_path):
    run_config = _tiny_run_config(tmp_path)
    grid = InProcessGrid(client_app, run_config, NODES, behaviours={1: _poisoned_upload})
    init = initial_state(RunConfig.from_run_config(run_config), 1, 3)
    strategy = FedAvgOneShot(progress=False)
    # Act
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init))
    # Assert: partition 1 refused by the upload checks, named with its reason
    assert [(f.partition_id, f.phase) for f in strategy.failures] == [(1, "train")]
    assert "running_var" in strategy.failures[0].reason
    assert [u.partition_id for u in strategy.uploads] == [0, 2]
    # Assert: the global model is the weighted average of the accepted uploads, sent to both
    expected = weighted_average([u.state for u in strategy.uploads],
                                [float(u.num_examples) for u in strategy.uploads])
    got = result.arrays.to_torch_state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    sent = _sent(grid, "train.personalize")
    assert [int(m.content["config"]["partition-id"]) for m in sent] == [0, 2]
    assert result.evaluate_metrics_clientapp[1]["num-clients"] == 2
    assert 0.0 <= result.evaluate_metrics_clientapp[1]["acc-after"] <= 1.0


def test_a_node_that_never_answers_is_a_failure_of_its_partition(tmp_path):
    def silent(msg, ctx, call):
        return None if msg.metadata.message_type == "train" else call(msg, ctx)

    grid = InProcessGrid(client_app, _tiny_run_config(tmp_path), NODES, behaviours={2: silent})
    init = initial_state(RunConfig.from_run_config(_tiny_run_config(tmp_path)), 1, 3)
    strategy = FedAvgOneShot(progress=False)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(init))
    # Assert: the SuperLink's expiry reply is charged to the node the instruction went to
    assert [(f.partition_id, f.node) for f in strategy.failures] == [(2, str(grid.node_ids[2]))]
    assert "no reply" in strategy.failures[0].reason
    assert SUPERLINK_NODE_ID not in {int(f.node) for f in strategy.failures}


def test_too_few_usable_uploads_stop_the_strategy_naming_them(tmp_path):
    grid = InProcessGrid(client_app, _tiny_run_config(tmp_path), NODES,
                         behaviours={1: _poisoned_upload})
    init = initial_state(RunConfig.from_run_config(_tiny_run_config(tmp_path)), 1, 3)
    with pytest.raises(RuntimeError, match=r"only 2 usable uploads, min_train_nodes is 3.*"
                                           r"running_var"):
        FedAvgOneShot(min_train_nodes=3, progress=False).start(
            grid=grid, initial_arrays=ArrayRecord(init))


def test_every_one_shot_method_of_the_catalog_has_its_strategy() -> None:
    assert sorted(cls.method_name for cls in STRATEGIES) == \
        sorted(method_names(kind="one-shot"))


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_a_strategys_defaults_are_its_settings_classes_defaults(cls) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    strategy = cls()
    for name in ("seed", "device", "precision", "progress", *cls.setting_names()):
        assert getattr(strategy.run_config, name) == defaults[name], name


def test_fedbicross_takes_the_papers_settings_and_any_key_of_its_settings_class() -> None:
    strategy = FedBiCross(num_clusters=3, synth_steps=7, kd_passes=2, seed=5)
    assert strategy.settings == FedBiCrossSettings(num_clusters=3, synth_steps=7, kd_passes=2,
                                                   seed=5)
    assert FedBiCross().settings == FedBiCrossSettings()  # the paper's defaults


def test_a_bad_setting_is_refused_when_the_strategy_is_built() -> None:
    with pytest.raises(ConfigError, match="synth-steps"):
        FedBiCross(synth_steps=0)
    with pytest.raises(TypeError, match="synth_stepz"):
        FedBiCross(synth_stepz=2)
    with pytest.raises(TypeError, match="synth_steps"):  # not a key FedAvg-1 reads
        FedAvgOneShot(synth_steps=2)


def test_from_run_config_reads_the_project_keys() -> None:
    run_config = {"num-clusters": 3, "synth-steps": 9, "seed": 4, "num-clients": 6,
                  "min-clients": 4, "site-nodes": "0=11,1=12", "max-num-examples": 50}
    strategy = FedBiCross.from_run_config(run_config, weight_lr=0.5)
    assert strategy.settings == FedBiCrossSettings(num_clusters=3, synth_steps=9, seed=4,
                                                   weight_lr=0.5)
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (6, 4)
    assert strategy.site_nodes == {0: 11, 1: 12} and strategy.max_num_examples == 50


def test_the_projects_run_builds_its_one_shot_methods_strategy_from_the_whole_run_config():
    # the project's phase 2 (server.server_method) takes the strategy strategy_for builds
    for name in method_names(kind="one-shot"):
        cfg = RunConfig(method=name, methods=f"{name},local", seed=3, model_width=8,
                        num_clients=4, min_clients=3)
        strategy = strategy_for(cfg.for_method(name, "x"))
        assert type(strategy).method_name == name
        # every key of the run, not only the method's settings (model-width, min-clients)
        assert strategy.run_config == cfg.for_method(name, "x")
        assert strategy.min_train_nodes == 3
    with pytest.raises(KeyError, match="'local' has no one-shot strategy"):
        strategy_for(RunConfig(method="local"))


def test_a_one_shot_strategy_runs_exactly_one_round(tmp_path) -> None:
    grid = InProcessGrid(client_app, _tiny_run_config(tmp_path), NODES)
    with pytest.raises(ValueError, match="num_rounds must be 1"):
        FedAvgOneShot().start(grid=grid, initial_arrays=ArrayRecord({}), num_rounds=2)
    assert grid.sent == []  # refused before anything was sent


def _claims(partition: int):
    """A node that answers ``train`` as ``partition`` without training (a forged reply)."""
    def behaviour(msg: Message, ctx: Context, call):
        reply = call(msg, ctx)
        if msg.metadata.message_type != "train":
            return reply
        config = ConfigRecord({"partition-id": partition})
        return Message(RecordDict({"arrays": reply.content["arrays"],
                                   "metrics": reply.content["metrics"], "config": config}),
                       reply_to=msg)
    return behaviour


def test_a_node_that_claims_another_partition_cannot_take_its_place(tmp_path):
    run_config = _tiny_run_config(tmp_path)
    grid = InProcessGrid(client_app, run_config, NODES, behaviours={1: _claims(0)})
    init = initial_state(RunConfig.from_run_config(run_config), 1, 3)
    strategy = FedAvgOneShot(progress=False)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(init))
    # Assert: node 1 is refused for its own partition; partition 0 is node 0's upload
    assert [(f.partition_id, f.node) for f in strategy.failures] == [(1, str(grid.node_ids[1]))]
    assert "spoofed partition-id" in strategy.failures[0].reason
    honest = _states([r for r in grid.replies if r.metadata.src_node_id == grid.node_ids[0]])
    assert _same_states({0: strategy.uploads[0].state}, honest)
    assert [u.partition_id for u in strategy.uploads] == [0, 2]


def test_without_a_binding_a_partition_claimed_twice_is_refused_for_both(tmp_path):
    run_config = _tiny_run_config(tmp_path)
    grid = InProcessGrid(client_app, run_config, NODES, behaviours={1: _claims(0)})
    init = initial_state(RunConfig.from_run_config(run_config), 1, 3)
    strategy = FedAvgOneShot(assign_partitions=False, min_train_nodes=1, progress=False)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(init))
    # Assert: the sites named their partitions (none was sent); 0 is refused, 2 goes on
    assert all("partition-id" not in m.content["config"] for m in _sent(grid, "train"))
    assert [(f.partition_id, "claimed by 2 nodes" in f.reason) for f in strategy.failures] == \
        [(0, True)]
    assert [u.partition_id for u in strategy.uploads] == [2]
    assert [m.metadata.dst_node_id for m in _sent(grid, "train.personalize")] == \
        [grid.node_ids[2]]


BASELINES = [(ClusterFedAvg, {"num_clusters": 2, "noise_samples": 16}),
             (FedISCA, {"fedisca_epochs": 2, "synth_steps": 2, "synth_batch": 8}),
             (DENSE, {"gen_epochs": 2, "gen_steps": 1, "gen_batch": 8}),
             (CoBoosting, {"gen_epochs": 2, "gen_steps": 1, "gen_batch": 8}),
             (DAFL, {"dafl_epochs": 2, "dafl_iterations": 1, "dafl_batch": 8})]


@pytest.mark.parametrize("cls, settings", BASELINES, ids=lambda x: getattr(x, "__name__", ""))
def test_every_baseline_runs_its_method_with_its_settings_on_the_grid(tmp_path, cls, settings):
    run_config = _tiny_run_config(tmp_path)
    grid = InProcessGrid(client_app, run_config, NODES)
    init = initial_state(RunConfig.from_run_config(run_config), 1, 3)
    strategy = cls(progress=False, output_dir=tmp_path / "out", **settings)
    # Act
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init))
    # Assert: every client personalized the model the method chose for it
    assert result.evaluate_metrics_clientapp[1]["num-clients"] == NODES
    assert _same_states(_states(_sent(grid, "train.personalize")), strategy.models)
    if cls is ClusterFedAvg:  # one model per cluster: no global model
        assert _clusters(tmp_path / "out" / "clusters.csv") == strategy.clusters
        assert (len(result.arrays) == 0) == (len(set(strategy.clusters.values())) > 1)
        return
    # Assert: one global model, distilled for the epochs it was given
    global_model = result.arrays.to_torch_state_dict()
    assert all(_same_states({0: global_model}, {0: s}) for s in strategy.models.values())
    diagnostics = json.loads((tmp_path / "out" / f"{cls.method_name}.json").read_text())
    assert len(diagnostics["epochs"]) == 2


def test_a_site_lying_about_its_accuracy_is_flagged_and_moves_the_median_less(tmp_path):
    """A user's ServerApp holds no site's test data: the figures are the sites' own. Two honest
    sites report 0.30 and 0.32 after personalization, the second node reports 1.0.
    """
    reported = {0: 0.30, 1: 1.0, 2: 0.32}  # by node index

    def report(i):
        def behaviour(msg: Message, ctx: Context, call):
            reply = call(msg, ctx)
            if msg.metadata.message_type != "train.personalize" or reply.has_error():
                return reply
            metrics = dict(reply.content["metrics"].items())
            metrics["acc-after"] = reported[i]
            return Message(RecordDict({"metrics": MetricRecord(metrics),
                                       "config": reply.content["config"]}), reply_to=msg)
        return behaviour

    run_config = _tiny_run_config(tmp_path)
    grid = InProcessGrid(client_app, run_config, NODES,
                         behaviours={i: report(i) for i in reported})
    init = initial_state(RunConfig.from_run_config(run_config), 1, 3)
    result = FedAvgOneShot(progress=False).start(grid=grid, initial_arrays=ArrayRecord(init))
    evaluation = result.evaluate_metrics_clientapp[1]
    assert evaluation["acc-after"] == pytest.approx((0.30 + 1.0 + 0.32) / 3)
    assert evaluation["acc-after-median"] == pytest.approx(0.32)
    assert evaluation["acc-after-outliers"] == 1
    assert "acc-before-median" in evaluation
