"""``fedbicross privacy-audit``: membership inference on the uploads of a finished run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from fedbicross_flwr.cli import main
from fedbicross_flwr.privacy.audit import attack_score
from tests.conftest import make_archive


def test_attack_score_direction_and_chance() -> None:
    members, nonmembers = np.arange(100, 200.0), np.arange(0, 100.0)
    assert attack_score(members, nonmembers).auc == 1.0
    assert attack_score(members, nonmembers).tpr_at_low_fpr == 1.0
    assert attack_score(nonmembers, members).auc == 0.0  # scores must be higher for members
    same = attack_score(np.zeros(50), np.zeros(50))
    assert same.auc == 0.5 and same.tpr_at_low_fpr == 0.0
    with pytest.raises(ValueError, match="needs members and non-members"):
        attack_score(np.zeros(3), np.zeros(0))


def _tiny_preset(tmp_path, n_train: int, **keys) -> Path:
    """A one-process run preset on a tiny custom archive, with ``keys`` on top."""
    preset = tmp_path / "run.toml"
    preset.write_text(tomli_w.dumps({
        "dataset": "custom", "data-path": str(make_archive(tmp_path / "site.npz",
                                                           n_train=n_train, n_val=6, n_test=24)),
        "in-channels": 1, "num-classes": 3, "alpha": 1.0, "min-partition-size": 5,
        "local-epochs": 1, "batch-size": 16, "local-lr": 0.01,
        "output-dir": str(tmp_path / "runs"), "progress": False, "node-wait-timeout": 0.0,
        "device": "cpu", **keys}))
    return preset


def test_audit_of_a_finished_run(tmp_path, capsys) -> None:
    # Prepare: a tiny one-process run whose clients go to a client cache
    preset = _tiny_preset(tmp_path, n_train=40, **{"num-clients": 2, "pers-epochs": 0,
                                                   "run-name": "audit", "method": "fedavg1"})
    cache = tmp_path / "cache"
    assert main(["run", "--preset", str(preset), "--client-cache", str(cache)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    # Execute
    assert main(["privacy-audit", str(run_dir), "--client-cache", str(cache)]) == 0
    # Assert: one row per client, scores in range, the report printed
    with (run_dir / "privacy-audit.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["model"], int(r["partition-id"])) for r in rows] == [
        ("upload", 0), ("upload", 1), ("personalized", 0), ("personalized", 1)]
    for row in rows:
        assert int(row["n-members"]) > 0 and int(row["n-nonmembers"]) > 0
        for key in ("loss-auc", "loss-tpr-at-1pct-fpr", "calibrated-auc",
                    "calibrated-tpr-at-1pct-fpr"):
            assert 0.0 <= float(row[key]) <= 1.0, key
    report = json.loads((run_dir / "privacy-audit.json").read_text())
    assert len(report["uploads"]["clients"]) == 2 and report["low-fpr"] == 0.01
    # fedavg1 synthesizes nothing: (b) says why; (c) recomputes the average it sent
    assert report["synthetic"] == {"available": False,
                                   "reason": "method 'fedavg1' synthesizes no images"}
    assert report["personalized"]["available"] and report["personalized"]["reproduced"]
    out = capsys.readouterr().out
    assert "| client | members |" in out and "Not audited: method 'fedavg1'" in out
    assert (run_dir / "privacy-audit.md").read_text().startswith("# Privacy audit of audit")
    # Assert: without the clients in the cache, one line and a non-zero exit
    assert main(["privacy-audit", str(run_dir), "--client-cache", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no trained clients of run" in err


def test_audit_of_a_fedbicross_run_covers_synthetic_and_personalized(tmp_path, capsys) -> None:
    # Prepare: a tiny FedBiCross run that keeps its checkpoints
    preset = _tiny_preset(tmp_path, n_train=45, **{
        "num-clients": 3, "pers-epochs": 1, "run-name": "fbc", "method": "fedbicross",
        "num-clusters": 2, "noise-samples": 8, "synth-steps": 2, "synth-batch": 8,
        "server-epochs": 1, "keep-checkpoints": True})
    cache = tmp_path / "cache"
    assert main(["run", "--preset", str(preset), "--client-cache", str(cache)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    # Execute
    assert main(["privacy-audit", str(run_dir), "--client-cache", str(cache),
                 "--pairs", "3"]) == 0
    # Assert (b): 2 clusters x 8 final synthetic images against pools of equal size
    report = json.loads((run_dir / "privacy-audit.json").read_text())
    syn = report["synthetic"]
    assert syn["available"] and syn["images"] == 16
    assert syn["pool-size"] == min(syn["train-images"], syn["test-images"]) == 24
    assert syn["subsampled"] == "train" and syn["train-images"] > 24
    s = syn["synthetic"]
    assert s["n"] + s["ties"] == 16 and s["reference"] == 0.5
    assert s["ci_low"] <= s["share"] <= s["ci_high"]
    assert syn["control-official-val"]["n"] + syn["control-official-val"]["ties"] == 6
    assert (run_dir / "privacy-audit-pairs.png").read_bytes()[:4] == b"\x89PNG"
    # Assert (c): the recomputed personalization is the run's, and it is audited
    per = report["personalized"]
    assert per["available"] and per["reproduced"], per
    assert per["max-abs-diff-acc-after"] == 0.0
    assert [r["partition-id"] for r in per["rows"]] == [0, 1, 2]
    with (run_dir / "privacy-audit.csv").open() as fh:
        models = [r["model"] for r in csv.DictReader(fh)]
    assert models == ["upload"] * 3 + ["personalized"] * 3
    md = (run_dir / "privacy-audit.md").read_text()
    assert "reproduces the run's clients.csv: yes" in md and "closer to a training" in md


def _kept_bilevel(run_dir: Path, students: list) -> None:
    """A run folder whose kept checkpoints hold ``students`` as the last epoch's models."""
    from fedbicross_flwr.storage.checkpoint_io import save_plain

    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    digest = save_plain({"students": students}, folder / "epoch0-bilevel.pt")
    (folder / "manifest.json").write_text(json.dumps(
        {"fingerprint": "f", "files": {"epoch0-bilevel": digest}}))
    (run_dir / "clusters.csv").write_text("partition-id,cluster\n0,0\n1,1\n")


@pytest.mark.parametrize("case", ["manifest-is-a-list", "files-is-a-string",
                                  "a-cluster-model-of-7-classes", "one-model-two-clusters"])
def test_the_audit_names_a_kept_checkpoint_it_refuses(tmp_path, case) -> None:
    # Prepare: a fedbicross run folder whose kept checkpoints were altered
    from fedbicross_flwr.config.run_config import RunConfig
    from fedbicross_flwr.model import build_resnet18
    from fedbicross_flwr.privacy.personalized import NotRecomputable, received_models

    cfg = RunConfig.from_run_config({"method": "fedbicross", "num-classes": 3,
                                     "in-channels": 1, "model-width": 4})
    good = build_resnet18(1, 3, 4).state_dict()
    students = {"a-cluster-model-of-7-classes": [good, build_resnet18(1, 7, 4).state_dict()],
                "one-model-two-clusters": [good]}.get(case, [good, good])
    _kept_bilevel(tmp_path, students)
    manifest = tmp_path / "checkpoints" / "manifest.json"
    if case == "manifest-is-a-list":
        manifest.write_text("[]")
    if case == "files-is-a-string":
        manifest.write_text(json.dumps({"fingerprint": "f", "files": "epoch0-bilevel"}))
    # Execute / Assert: one reason naming the file, never a traceback
    with pytest.raises(NotRecomputable) as err:
        received_models(tmp_path, cfg, {})
    assert {"manifest-is-a-list": "manifest.json is refused: the manifest is a list",
            "files-is-a-string": "manifest.json is refused: the manifest's files are a str",
            "a-cluster-model-of-7-classes": "epoch0-bilevel.pt: cluster model 1 is refused: "
                                            "different number of classes",
            "one-model-two-clusters": "names clusters [0, 1], the checkpoint holds 1 cluster "
                                      "models"}[case] in str(err.value)
    # the intact folder is read
    if case == "a-cluster-model-of-7-classes":
        _kept_bilevel(tmp_path / "intact", [good, good])
        assert sorted(received_models(tmp_path / "intact", cfg, {})) == [0, 1]
