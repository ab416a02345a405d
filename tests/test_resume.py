"""A whole run interrupted in the server stage resumes in its folder and gives the same result."""

from __future__ import annotations

import csv

import pytest

import fedbicross_flwr.fedbicross.method as method_module
from fedbicross_flwr.config.run_config import ConfigError, RunConfig
from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer
from fedbicross_flwr.reports.results import create_run_dir
from fedbicross_flwr.runners.direct import run_direct

TINY_SERVER = {"method": "fedbicross", "num-clusters": 2, "noise-samples": 8,
               "synth-steps": 3, "synth-batch": 8, "server-epochs": 2}


def _after(run_dir) -> dict[int, str]:
    with (run_dir / "clients.csv").open() as fh:
        return {int(r["partition-id"]): r["acc-after"] for r in csv.DictReader(fh)}


def test_interrupted_run_resumes_in_place_with_the_same_numbers(tiny_run_config, monkeypatch):
    # Prepare: a clean run, then the same config under another name crashing in server epoch 2
    base = {**tiny_run_config, **TINY_SERVER}
    clean = run_direct(RunConfig.from_run_config({**base, "run-name": "clean"}))
    original = OnlineBilevelTrainer.run_epoch
    calls = []

    def crash_in_epoch_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("server stopped")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", crash_in_epoch_two)
    crashed_cfg = RunConfig.from_run_config({**base, "run-name": "crashed"})
    with pytest.raises(KeyboardInterrupt):
        run_direct(crashed_cfg)
    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", original)
    folder = clean.parent / "crashed"
    assert (folder / "checkpoints" / "uploads.pt").is_file()
    assert not (folder / "summary.json").exists()
    # the log says what is kept and the command that goes on from it
    assert (f"the run was stopped before it finished (a signal: `flwr stop`, the SuperLink "
            f"going down, Ctrl-C); the stages it finished are kept in {folder / 'checkpoints'}: "
            "rerun the same command with run-name='crashed' resume=true") in (
        folder / "log.txt").read_text()
    # Execute: resume; count syntheses
    synth = []
    real_synth = method_module.synthesize_trajectory
    monkeypatch.setattr(method_module, "synthesize_trajectory",
                        lambda *a, **k: synth.append(1) or real_synth(*a, **k))
    resumed = run_direct(crashed_cfg.replace(resume=True))
    # Assert: same folder, no synthesis redone, same per-client results, checkpoints cleaned up
    assert resumed == folder
    assert synth == []
    assert _after(resumed) == _after(clean)
    assert not (resumed / "checkpoints").exists()
    # A finished run is never overwritten by a resume
    with pytest.raises(FileExistsError, match="already finished"):
        run_direct(crashed_cfg.replace(resume=True))
    # Without resume the same name gives a NEW folder
    assert create_run_dir(crashed_cfg).name == "crashed-1"


def test_resume_needs_a_run_name(tiny_run_config):
    with pytest.raises(ConfigError, match="run-name"):
        RunConfig.from_run_config({**tiny_run_config, "run-name": "", "resume": True})


def test_a_resume_from_scaled_students_recomputes_the_epoch(tiny_run_config, monkeypatch):
    # Prepare: a clean run, and the same run stopped in server epoch 2 whose epoch-1 state
    # then holds its cluster models x1e3, with the manifest's sha256 rewritten to match
    import json

    from fedbicross_flwr.storage.checkpoint_io import load_plain, save_plain

    base = {**tiny_run_config, **TINY_SERVER, "model-width": 4}
    clean = run_direct(RunConfig.from_run_config({**base, "run-name": "clean"}))
    original = OnlineBilevelTrainer.run_epoch
    calls = []

    def stop_in_epoch_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("server stopped")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", stop_in_epoch_two)
    cfg = RunConfig.from_run_config({**base, "run-name": "scaled"})
    with pytest.raises(KeyboardInterrupt):
        run_direct(cfg)
    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", original)
    folder = clean.parent / "scaled" / "checkpoints"
    manifest = json.loads((folder / "manifest.json").read_text())
    state = load_plain(folder / "epoch0-bilevel.pt", manifest["files"]["epoch0-bilevel"])
    state["students"] = [{k: v * 1e3 if v.is_floating_point() else v for k, v in s.items()}
                         for s in state["students"]]
    manifest["files"]["epoch0-bilevel"] = save_plain(state, folder / "epoch0-bilevel.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    # Execute: resume (before, a FloatingPointError traceback on every resume)
    resumed = run_direct(cfg.replace(resume=True))
    # Assert: the file named in one line and kept aside; the run's numbers are a clean run's
    log_lines = (resumed / "log.txt").read_text().splitlines()
    named = [line for line in log_lines if "epoch0-bilevel.pt does not hold" in line]
    assert len(named) == 1 and "is not a usable model" in named[0], named
    assert "set aside as epoch0-bilevel.pt.bad" in named[0]
    assert (folder / "epoch0-bilevel.pt.bad").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0-bilevel.pt.bad"]
    assert _after(resumed) == _after(clean)
