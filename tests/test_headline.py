"""A site's own accuracy cannot move the headline unseen.

In a simulation the server scores the personalized models itself: one of three sites reporting
``acc-after = 1.0`` leaves the paper metric where the honest run has it, and the lie is listed
as a self-report mismatch. In a deployment the figures are self-reported: the summary and the
comparison list them per site, with the median beside the mean and the lying site flagged.
(Real ServerApp and ClientApp, in process, fedavg1, three sites.)
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedbicross_flwr.reports.comparison import comparison_markdown, comparison_rows
from fedbicross_flwr.reports.headline import SELF_REPORTED, outlier_sites
from fedbicross_flwr.reports.scoring import differs, tolerance
from fedbicross_flwr.runners.inprocess import run_in_process
from fedbicross_flwr.transports.replies import ReplyError, read_reply
from tests.conftest import inprocess_config, make_archive


def _config(tmp, name: str, **extra) -> dict:
    return inprocess_config(tmp, name, **{"num-clients": 3, "model-width": 8, **extra})


def reports_perfect_accuracy(msg, ctx, call):
    """A site that personalizes honestly, then reports acc-after = 1.0 (whatever else it
    sends, a returned model included, is the honest one).
    """
    reply = call(msg, ctx)
    if msg.metadata.message_type != "train.personalize" or reply.has_error():
        return reply
    content = RecordDict(dict(reply.content.items()))
    content["metrics"] = MetricRecord({**dict(content["metrics"].items()), "acc-after": 1.0})
    return Message(content, reply_to=msg)


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """The same simulation twice: every site honest, then site 2 lying in phase 3."""
    tmp = tmp_path_factory.mktemp("headline-sim")
    data = str(make_archive(tmp / "d.npz", n_train=90))
    _, honest = run_in_process(_config(tmp, "honest", **{"data-path": data}), num_nodes=3)
    grid, lying = run_in_process(_config(tmp, "lying", **{"data-path": data}), num_nodes=3,
                                 behaviours={2: reports_perfect_accuracy})
    return _summary(honest), _summary(lying), grid


def test_in_a_simulation_a_lying_site_does_not_move_the_headline(simulation) -> None:
    honest, lying, _ = simulation
    assert lying["num-completed"] == 3
    assert lying["paper-metric"] == honest["paper-metric"]
    assert honest["scored-by"] == lying["scored-by"] == "server"
    assert lying["acc-after-per-site"]["2"] < 1.0  # the server's figure, not the site's
    assert lying["acc-after-per-site"] == honest["acc-after-per-site"]
    for key in ("acc-before-mean", "acc-personal-after-mean", "acc-personal-before-mean"):
        assert lying[key] == honest[key], key


def test_in_a_simulation_the_lie_is_listed_against_the_servers_figure(simulation) -> None:
    honest, lying, _ = simulation
    assert honest["failures"] == []
    (mismatch,) = lying["failures"]
    server = lying["acc-after-per-site"]["2"]
    assert mismatch["partition_id"] == 2
    assert mismatch["phase"] == "personalize (server scoring)"
    assert f"acc-after 1 (server: {server:.4g})" in mismatch["reason"]
    assert mismatch["reason"].endswith("the server's figures are used")


def test_the_personalized_models_are_no_cost_of_the_method(simulation) -> None:
    honest, _, grid = simulation
    asked = [m for m in grid.sent if m.metadata.message_type == "train.personalize"]
    assert len(asked) == 3 and all(m.content["config"]["return-personalized-model"]
                                   for m in asked)
    returned = [r for r in grid.replies if r.metadata.message_type == "train.personalize"]
    assert all("arrays" in r.content for r in returned)
    # bytes up: phase 1's model and phase 3's metrics, not the model returned to be scored
    model_bytes = sum(t.numel() * t.element_size() for t in
                      returned[0].content["arrays"].to_torch_state_dict().values())
    assert model_bytes < honest["cost"]["bytes-up-per-client"] < 1.1 * model_bytes


def test_in_a_deployment_the_self_reported_figures_are_listed_with_median_and_flag(
        tmp_path) -> None:
    # Prepare: three deployment sites, each with its own archive; site 2 lies in phase 3
    paths = [make_archive(tmp_path / f"site{i}.npz", seed=30 + i) for i in range(3)]
    node_configs = [{"data-path": str(p), "partition-id": i} for i, p in enumerate(paths)]
    # Execute
    _, run_dir = run_in_process(_config(tmp_path, "deployment"), num_nodes=3,
                                node_configs=node_configs,
                                behaviours={2: reports_perfect_accuracy})
    # Assert: the figures are the sites' own, listed per site, the median beside the mean,
    # and the lying site flagged as far from the others
    summary = _summary(run_dir)
    per_site = summary["acc-after-per-site"]
    assert summary["scored-by"] == SELF_REPORTED
    assert per_site["2"] == 1.0 and max(per_site["0"], per_site["1"]) < 0.7
    assert summary["acc-after-median"] == statistics.median(per_site.values())
    assert summary["acc-after-mean"] == pytest.approx(statistics.mean(per_site.values()))
    assert summary["acc-after-median"] < summary["acc-after-mean"]
    assert summary["acc-after-outliers"] == [2]
    text = (run_dir / "summary.md").read_text()
    assert "scored by: site (self-reported)" in text
    assert "2: 100.00 (far from the others)" in text
    # ... and the comparison table shows them the same way
    table = comparison_markdown(comparison_rows({"fedavg1": run_dir}))
    assert "| site (self-reported) | " in table
    assert f"| {100 * summary['acc-after-median']:.2f} |" in table
    assert "- fedavg1: 0: " in table and "2: 100.00 (far from the others)" in table


@pytest.mark.parametrize(("figures", "flagged"), [
    ({0: 1 / 3, 1: 1 / 3, 2: 1.0}, [2]),  # the case: 0.3333 -> 0.5556 by one site
    ({0: 0.55, 1: 0.62, 2: 0.70, 3: 0.58}, []),  # honest spread: nothing flagged
    ({0: 0.50, 1: 0.52, 2: 0.51, 3: 0.49, 4: 0.95}, [4]),
    ({0: 0.30, 1: 0.31, 2: 0.32, 3: 0.10}, [3]),  # far below counts too
    ({0: 0.3, 1: 1.0}, []),  # two sites: no "others" to compare with
])
def test_the_outlier_rule(figures, flagged) -> None:
    assert outlier_sites(figures) == flagged


def test_a_figure_is_a_mismatch_beyond_one_prediction() -> None:
    assert tolerance(30) == pytest.approx(1 / 30) and tolerance(10_000) == 0.01
    assert not differs(0.5, 0.5 + 1 / 30, 30) and differs(0.5, 0.5 + 2 / 30, 30)
    assert differs(1.0, 1 / 3, 30)
    assert not differs(float("nan"), float("nan"), 0) and differs(0.5, float("nan"), 0)


def _personalize_reply(with_arrays: bool) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"partition-id": 0})}),
                      dst_node_id=5, message_type="train.personalize")
    content = RecordDict({"metrics": MetricRecord({"acc-after": 0.5}),
                          "config": ConfigRecord({"partition-id": 0})})
    if with_arrays:
        content["arrays"] = ArrayRecord({"w": torch.zeros(2)})
    return Message(content, reply_to=request)


def test_a_personalized_model_is_read_only_where_the_server_asked_for_it() -> None:
    assert read_reply(_personalize_reply(True), "train.personalize",
                      with_model=True).state is not None
    with pytest.raises(ReplyError, match="no arrays record .an ArrayRecord of the personalized model, to score"):
        read_reply(_personalize_reply(False), "train.personalize", with_model=True)
    with pytest.raises(ReplyError, match="has a record 'arrays' that the phase does not"):
        read_reply(_personalize_reply(True), "train.personalize")
