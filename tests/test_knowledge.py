"""Knowledge flow: the teacher mixtures, retention, and knowledge.json of a real run."""

from __future__ import annotations

import json

import pytest
import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.methods.base import ClientUpload
from fedbicross_flwr.model import build_resnet18
from fedbicross_flwr.reports.knowledge import (
    accuracy_of,
    agreement,
    knowledge_report,
    mixture_probs,
    retention,
)
from fedbicross_flwr.runners.direct import run_direct_methods


def test_mixture_is_the_weighted_mean_of_the_cluster_teachers() -> None:
    f0 = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    f1 = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    mix = mixture_probs([f0, f1], [1.0, 3.0])  # weights normalised to 0.25 / 0.75
    # by hand: 0.25 * 0.8 + 0.75 * 0.2 = 0.35; 0.25 * 0.1 + 0.75 * 0.5 = 0.4
    assert torch.allclose(mix, torch.tensor([[0.35, 0.65], [0.4, 0.6]]))
    with pytest.raises(ValueError, match="non-negative"):
        mixture_probs([f0, f1], [-1.0, 1.0])
    with pytest.raises(ValueError, match="2 cluster teachers but 1"):
        mixture_probs([f0, f1], [1.0])


def test_accuracy_agreement_and_retention_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy_of(probs, torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)
    assert agreement(torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0]]), probs) == pytest.approx(
        2 / 3)
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.3, 0.0) != retention(0.3, 0.0)  # NaN: no ceiling to retain


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_resnet18(1, 3)
    with torch.no_grad():  # a non-trivial BN state, so eval-mode outputs differ per model
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def test_report_teachers_match_an_independent_computation() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 3, (12,))
    states = [_random_state(s) for s in range(3)]
    uploads = [ClientUpload(pid, st, 10) for pid, st in enumerate(states)]
    clusters = {0: 0, 1: 0, 2: 1}
    received = {0: states[2], 1: states[2], 2: states[0]}
    weights = [[0.7, 0.3], [0.0, 1.0]]
    rows = [{"partition-id": p, "acc-after": 0.5 + 0.1 * p, "status": "ok"} for p in range(3)]
    report = knowledge_report("fedbicross", "prob", uploads, received, clusters, weights, rows,
                              (x, y), 1, 3, torch.device("cpu"))

    def probs(state):
        m = build_resnet18(1, 3)
        m.load_state_dict(state)
        return m.eval()(x).softmax(1).detach()

    p = [probs(s) for s in states]
    f0, f1 = (p[0] + p[1]) / 2, p[2]
    c0, c1 = report["clusters"]
    assert c0["members"] == [0, 1] and c1["members"] == [2]
    assert c0["cluster-ensemble-acc"] == pytest.approx(accuracy_of(f0, y))
    assert c0["teacher-acc"] == pytest.approx(accuracy_of(0.7 * f0 + 0.3 * f1, y))
    assert c1["teacher-acc"] == pytest.approx(accuracy_of(f1, y))
    assert c0["received-acc"] == pytest.approx(accuracy_of(p[2], y))
    assert c0["after-acc"] == pytest.approx(0.55)  # mean of partitions 0 and 1
    assert report["stages"]["all-client-ensemble-acc"] == pytest.approx(
        accuracy_of(sum(p) / 3, y))
    # client-weighted: cluster 0 has two clients, cluster 1 one
    assert report["stages"]["received-acc"] == pytest.approx(
        (2 * c0["received-acc"] + c1["received-acc"]) / 3)


def test_a_distilling_run_writes_knowledge_json_and_others_do_not(tiny_run_config) -> None:
    cfg = RunConfig.from_run_config({
        **tiny_run_config, "run-name": "kf", "synth-steps": 3, "synth-batch": 6,
        "noise-samples": 8, "num-clusters": 2, "kmeans-n-init": 1})
    dirs = run_direct_methods(cfg, ["fedavg1", "fedbicross"])
    assert not (dirs["fedavg1"] / "knowledge.json").exists()
    report = json.loads((dirs["fedbicross"] / "knowledge.json").read_text())
    stages = report["stages"]
    for key in ("all-client-ensemble-acc", "teacher-acc", "agreement-synthetic",
                "agreement-real", "received-acc", "after-acc", "retention"):
        assert stages[key] is not None and 0.0 <= stages[key] <= (1.0 if key != "retention"
                                                                   else 1e6), key
    assert sum(len(c["members"]) for c in report["clusters"]) == 3
    summary = json.loads((dirs["fedbicross"] / "summary.json").read_text())
    assert summary["knowledge"]["received-acc"] == pytest.approx(stages["received-acc"])
    assert "Knowledge flow" in (dirs["fedbicross"] / "summary.md").read_text()


def test_cluster_average_start_is_the_size_weighted_average_of_the_cluster() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(48, 1, 28, 28), torch.randint(0, 3, (48,))
    states = [_random_state(s) for s in range(3)]
    uploads = [ClientUpload(0, states[0], 10), ClientUpload(1, states[1], 30),
               ClientUpload(2, states[2], 5)]
    clusters = {0: 0, 1: 0, 2: 1}
    received = {p: states[2] for p in range(3)}
    rows = [{"partition-id": p, "acc-after": 0.5, "status": "ok"} for p in range(3)]
    args = ("fedbicross", "prob", uploads, received, clusters, [[1.0, 0.0], [0.0, 1.0]], rows,
            (x, y), 1, 3, torch.device("cpu"))
    report = knowledge_report(*args, student_init="cluster-average")
    plain = knowledge_report(*args)  # random start: nothing to report

    # by hand: cluster 0 starts at (10 * f_0 + 30 * f_1) / 40, cluster 1 at f_2 itself
    start = {name: (0.25 * v + 0.75 * states[1][name]) if v.is_floating_point() else v
             for name, v in states[0].items()}
    model = build_resnet18(1, 3)
    model.load_state_dict(start)
    c0, c1 = report["clusters"]
    assert c0["start-acc"] == pytest.approx(accuracy_of(model.eval()(x).softmax(1).detach(), y))
    model.load_state_dict(states[2])
    assert c1["start-acc"] == pytest.approx(accuracy_of(model.eval()(x).softmax(1).detach(), y))
    assert report["stages"]["start-acc"] == pytest.approx(
        (2 * c0["start-acc"] + c1["start-acc"]) / 3)
    assert "start-acc" not in plain["clusters"][0] and plain["stages"]["start-acc"] is None
