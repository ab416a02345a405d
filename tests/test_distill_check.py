"""`fedbicross distill-check`: one central teacher distilled through a real method."""

from __future__ import annotations

import csv
import json

import pytest

from fedbicross_flwr.cli import main


def _args(out, archive, teacher_epochs: int, keys: str) -> list[str]:
    """``fedbicross distill-check`` of fedbicross on the tiny archive, with run-config ``keys``."""
    return ["distill-check", "--dataset", "custom", "--synthesis", "fedbicross",
            "--teacher-epochs", str(teacher_epochs), "--out", str(out), "--run-config",
            f"data-path='{archive}' in-channels=1 num-classes=3 synth-steps=2 synth-batch=8 "
            f"batch-size=16 progress=false {keys}"]


def _rows(out):
    with (out / "distill-check.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_distill_check_appends_a_retention_row_and_reuses_the_teacher(tiny_archive, tmp_path,
                                                                      capsys) -> None:
    out = tmp_path / "dc"
    args = _args(out, tiny_archive, 2, "kd-batch=4")
    # Execute: twice, the second time with the cached teacher
    assert main(args) == 0
    assert main(args) == 0
    # Assert
    rows = _rows(out)
    assert len(rows) == 2 and {r["synthesis"] for r in rows} == {"fedbicross"}
    for r in rows:
        teacher, student = float(r["teacher-acc"]), float(r["student-acc"])
        assert float(r["retention"]) == pytest.approx(student / teacher, abs=1e-3)
        assert r["kd-batch"] == "4" and r["synth-steps"] == "2"
        assert 0.0 <= float(r["student-acc-batch-bn"]) <= 1.0
        assert 0.0 <= float(r["student-acc-real-bn"]) <= 1.0
    # Where the knowledge goes: each teacher's soft labels per part of the trajectory
    (report,) = [p for p in out.glob("*/distill-check.json")][:1]
    summary = json.loads(report.read_text())["diagnostics"]["synthesis-summary"][0]
    profile = summary["soft-label-profile"]
    assert set(profile) == {"teacher", "noise_teacher"}
    assert [part["steps"] for part in profile["teacher"]] == [[1, 1], [2, 2]]  # T = 2
    assert sum(profile["teacher"][0]["argmax-histogram"]) == 8  # B images
    assert rows[0]["teacher-acc"] == rows[1]["teacher-acc"]  # the cached teacher
    assert "| custom | fedbicross |" in capsys.readouterr().out
    # A teacher file that does not match its checksum is retrained, not trusted
    (teacher_file,) = (out / "teachers").glob("*.pt")
    teacher_file.write_bytes(teacher_file.read_bytes()[:-10] + b"0" * 10)
    assert main(args) == 0
    assert len(_rows(out)) == 3


def test_distill_check_refuses_a_method_that_does_not_distil(tiny_archive, tmp_path,
                                                             capsys) -> None:
    code = main(["distill-check", "--dataset", "custom", "--synthesis", "fedavg1",
                 "--teacher-epochs", "1", "--out", str(tmp_path), "--run-config",
                 f"data-path='{tiny_archive}' in-channels=1 num-classes=3 progress=false"])
    assert code == 2
    assert "--synthesis must be one of" in capsys.readouterr().err


def test_append_row_keeps_old_rows_when_columns_are_added(tmp_path) -> None:
    from fedbicross_flwr.experiments.distill_check import append_row

    path = tmp_path / "rows.csv"
    append_row(path, {"a": 1, "b": 2})
    append_row(path, {"a": 3, "b": 4, "c": 5})
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]


def test_batch_bn_probe_mixes_the_classes_of_a_class_sorted_test_split() -> None:
    # A test split stored sorted by class (as bloodmnist-pbc's is) must not give one-class
    # batches to the batch-statistics probe: each image encodes its class in its brightness,
    # and a recording model sees how many classes each training-mode test batch holds.
    import numpy as np
    import torch
    from torch import nn

    from fedbicross_flwr.data.datasets import ArraySplit, DatasetArrays
    from fedbicross_flwr.experiments.distill_check import bn_probes

    class Recorder(nn.Module):
        batches: list[int] = []

        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(1)
            self.fc = nn.Linear(1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and x.shape[0] in (16, 12):  # the test batches (60 = 3 x 16 + 12)
                Recorder.batches.append(len(torch.unique(x[:, 0, 0, 0])))
            return self.fc(self.bn(x).mean(dim=(2, 3)))

    labels = np.repeat(np.arange(3), 20)
    images = np.broadcast_to((labels * 80)[:, None, None], (60, 28, 28)).astype(np.uint8)
    split = ArraySplit(images.copy(), labels.astype(np.int64))
    big_train = ArraySplit(np.zeros((7, 28, 28), np.uint8), np.zeros(7, np.int64))
    bn_probes(Recorder(), DatasetArrays("t", 1, 3, big_train, split, split),
              torch.device("cpu"), 16)
    assert len(Recorder.batches) == 4 and min(Recorder.batches) >= 2, Recorder.batches


def test_a_stopped_distill_check_resumes_from_its_last_server_epoch(tiny_archive, tmp_path,
                                                                     monkeypatch) -> None:
    from fedbicross_flwr.fedbicross.stages import StageRunner

    out = tmp_path / "dc"
    args = _args(out, tiny_archive, 1, "server-epochs=3 run-name='e3' resume=true")
    # Prepare: the first call stops after server epoch 2 of 3 was saved
    real = StageRunner.finish_epoch

    def stop_after_epoch_2(self, epoch, *rest):
        real(self, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(StageRunner, "finish_epoch", stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (out / "distill-check.csv").exists()
    assert (out / "e3" / "checkpoints" / "epoch1-bilevel.pt").exists()
    # Execute: the same command again
    monkeypatch.setattr(StageRunner, "finish_epoch", real)
    assert main(args) == 0
    # Assert: epochs 1-2 were restored, only the third computed, and the row written
    log_text = (out / "e3" / "log.txt").read_text()
    assert "server epochs 1..2 restored from checkpoint" in log_text
    after = log_text.split("restored from checkpoint")[-1]
    assert "epoch 3/3" in after and "epoch 2/3" not in after and "epoch 1/3" not in after
    assert len(_rows(out)) == 1
