"""Each baseline end to end through the real ServerApp/ClientApp (in-process grid), tiny config."""

import json

import pytest
import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.methods import method_names
from fedbicross_flwr.runners.inprocess import run_in_process
from fedbicross_flwr.strategies import BY_METHOD

TINY = {
    "fedisca": {"fedisca-epochs": 2, "synth-steps": 3, "synth-batch": 6, "fedisca-lr": 0.01},
    "dense": {"gen-epochs": 2, "gen-steps": 2, "gen-batch": 6, "gen-latent": 8},
    "coboosting": {"gen-epochs": 3, "gen-steps": 2, "gen-batch": 6, "gen-latent": 8,
                   "coboosting-weight-lr": 0.2},
    "dafl": {"dafl-epochs": 2, "dafl-iterations": 2, "dafl-batch": 6, "dafl-latent": 8},
}


def _sent_models(grid) -> dict[int, dict[str, torch.Tensor]]:
    pid_of_node = {}
    for reply in grid.replies:
        if reply.metadata.message_type == "train":
            pid_of_node[reply.metadata.src_node_id] = int(reply.content["config"]["partition-id"])
    return {pid_of_node[m.metadata.dst_node_id]: m.content["arrays"].to_torch_state_dict()
            for m in grid.sent if m.metadata.message_type == "train.personalize"}


@pytest.mark.parametrize("method", sorted(TINY))
def test_baseline_end_to_end_in_process(tiny_run_config, method):
    # Execute
    # pers-epochs=0: phase 3 only evaluates (the Eq. 9 loop is tested elsewhere), saving time
    grid, run_dir = run_in_process({**tiny_run_config, "method": method, "pers-epochs": 0,
                                    **TINY[method]}, num_nodes=3)
    # Assert: one global model, the same for every client, different from every upload
    sent = _sent_models(grid)
    assert sorted(sent) == [0, 1, 2]
    for pid in (1, 2):
        assert all(torch.equal(sent[0][k], sent[pid][k]) for k in sent[0])
    uploads = [r.content["arrays"].to_torch_state_dict() for r in grid.replies
               if r.metadata.message_type == "train"]
    assert all(not torch.equal(sent[0]["fc.weight"], u["fc.weight"]) for u in uploads)
    assert all(torch.isfinite(v.float()).all() for v in sent[0].values())
    # Assert: artefacts and a completed personalization round
    for name in ("synthetic.png", f"{method}.json", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num-completed"] == 3
    diag = json.loads((run_dir / f"{method}.json").read_text())
    assert len(diag["epochs"]) == TINY[method][next(k for k in TINY[method] if "epochs" in k)]
    if method == "coboosting":
        history = diag["weight_history"]  # initial + one row per epoch
        assert len(history) == 4
        assert all(0.0 <= w <= 1.0 for row in history for w in row)
        assert history[-1] != history[0]  # the boosting step moved the weights


def test_baselines_are_registered_and_configurable():
    for name in ("fedisca", "dense", "coboosting", "dafl"):
        assert name in method_names(group="baseline", distils=True) and name in BY_METHOD
        assert RunConfig.from_run_config({"method": name}).method == name
