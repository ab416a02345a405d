"""Resumable server stages: a crash at any point loses nothing, a resume equals a clean run."""

import json

import numpy as np
import pytest
import torch

import fedbicross_flwr.fedbicross.method as method_module
from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer
from fedbicross_flwr.fedbicross.checkpoint import CheckpointMismatch
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross
from tests.tiny_models import make_tiny

TINY = dict(noise_samples=8, synth_steps=3, synth_batch=8, synth_lr=0.1, bn_weight=0.1,
            num_examples=4, kmeans_n_init=2, num_clusters=2, server_epochs=2)


def _run(checkpoint_dir=None, **overrides):
    clients = [make_tiny(seed) for seed in range(4)]
    settings = FedBiCrossSettings(**{**TINY, **overrides})
    return run_fedbicross(clients, 1, 3, settings, "cpu", progress=False, image_size=6,
                          student_factory=lambda: make_tiny(99).train(),
                          checkpoint_dir=checkpoint_dir)


def _assert_same(a, b):
    assert np.array_equal(a.assignment, b.assignment)
    assert np.array_equal(a.weight_history, b.weight_history)
    for sa, sb in zip(a.cluster_models, b.cluster_models, strict=True):
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
    for xa, xb in zip(a.synthetic_examples, b.synthetic_examples, strict=True):
        assert torch.equal(xa, xb)


class Crash(RuntimeError):
    pass


def _counting(monkeypatch, name, crash_on=None):
    """Wrap method_module.<name>: count calls, raise Crash on call number ``crash_on``."""
    original = getattr(method_module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if crash_on is not None and len(calls) == crash_on:
            raise Crash(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(method_module, name, wrapper)
    return calls


@pytest.fixture(scope="module")
def clean():
    return _run()


def test_checkpointing_does_not_change_the_result(tmp_path, clean):
    result = _run(tmp_path / "ckpt")
    _assert_same(result, clean)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    # Only the final state survives: synthesis checkpoints are dropped once an epoch is done.
    assert sorted(manifest["files"]) == ["clustering", "epoch1-bilevel"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["clustering.pt",
                                                                        "epoch1-bilevel.pt"]


def test_crash_in_second_server_epoch_resumes_without_redoing_epoch_one(tmp_path, monkeypatch,
                                                                         clean):
    # Prepare: the bi-level stage of server epoch 2 crashes
    original = OnlineBilevelTrainer.run_epoch
    epochs = []

    def crash_second(self, *args, **kwargs):
        epochs.append(1)
        if len(epochs) == 2:
            raise Crash("bilevel epoch 2")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", crash_second)
    with pytest.raises(Crash):
        _run(tmp_path / "ckpt")
    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", original)
    # Execute: resume, counting the expensive calls
    clustering = _counting(monkeypatch, "noise_predictions")
    synthesis = _counting(monkeypatch, "synthesize_trajectory")
    resumed = _run(tmp_path / "ckpt")
    # Assert: no clustering, no epoch-1 synthesis; epoch 2's two clusters (saved before the
    # crash) restored too, so nothing is synthesized again; same numbers as a clean run.
    assert clustering == [] and synthesis == []
    _assert_same(resumed, clean)


def test_crash_during_synthesis_redoes_only_the_unfinished_cluster(tmp_path, monkeypatch, clean):
    # Prepare: the synthesis of cluster 1 in server epoch 1 (2nd call) crashes
    _counting(monkeypatch, "synthesize_trajectory", crash_on=2)
    with pytest.raises(Crash):
        _run(tmp_path / "ckpt")
    # Execute
    synthesis = _counting(monkeypatch, "synthesize_trajectory")
    resumed = _run(tmp_path / "ckpt")
    # Assert: cluster 1 of epoch 1 and both clusters of epoch 2, nothing else
    assert len(synthesis) == 3
    _assert_same(resumed, clean)


def test_checkpoints_of_other_settings_are_refused(tmp_path):
    _run(tmp_path / "ckpt", server_epochs=1)
    with pytest.raises(CheckpointMismatch, match="other settings"):
        _run(tmp_path / "ckpt", server_epochs=1, synth_lr=0.2)


def test_corrupt_checkpoint_is_recomputed_not_used(tmp_path, monkeypatch, clean):
    # Prepare: a finished run whose final checkpoint is then damaged on disk
    _run(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "epoch1-bilevel.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # Execute
    synthesis = _counting(monkeypatch, "synthesize_trajectory")
    resumed = _run(tmp_path / "ckpt")
    # Assert: the damaged state is not loaded; the epoch-1 state was superseded (deleted), so
    # both server epochs are redone from the intact clustering checkpoint: same numbers.
    assert len(synthesis) == 4
    _assert_same(resumed, clean)


class _Payload:
    """A pickle that creates a file when unpickled (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _forge(directory, name, payload):
    """Replace checkpoint ``name`` and update the manifest's sha256, as an attacker would."""
    from fedbicross_flwr.storage.checkpoint_io import sha256_file

    path = directory / f"{name}.pt"
    torch.save(payload, path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(path)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("tamper", ["pickle", "nan"])
def test_a_tampered_checkpoint_with_a_valid_checksum_is_refused_and_recomputed(
        tmp_path, monkeypatch, clean, caplog, tamper):
    # Prepare: a finished run; its clustering checkpoint is replaced by a pickle payload that
    # runs code when loaded, or by NaN predictions, with the manifest's sha256 updated
    _run(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    if tamper == "pickle":
        payload = {"preds": _Payload(marker), "assignment": None, "degenerate": []}
    else:
        payload = {"preds": torch.full((4, 24), float("nan")), "assignment": None,
                   "degenerate": []}
    path = _forge(tmp_path / "ckpt", "clustering", payload)
    forged = path.read_bytes()
    # Execute
    clustering = _counting(monkeypatch, "noise_predictions")
    with caplog.at_level("WARNING"):
        resumed = _run(tmp_path / "ckpt")
    # Assert: refused with the reason, never run; clustering redone; same numbers
    assert not marker.exists()
    reason = ("is not plain tensor data and was not loaded" if tamper == "pickle"
              else "holds NaN/Inf values in ['preds']")
    assert f"checkpoint {path} {reason}" in caplog.text
    if tamper == "pickle":
        assert "Unsupported global: GLOBAL io.open" in caplog.text
    assert "recomputing that stage" in caplog.text
    assert len(clustering) == 1
    _assert_same(resumed, clean)
    if tamper == "pickle":  # the payload is live: an unsafe load would have run it
        (tmp_path / "forged.pt").write_bytes(forged)
        torch.load(tmp_path / "forged.pt", weights_only=False)
        assert marker.exists()


def test_numpy_payloads_round_trip_as_plain_data(tmp_path):
    from fedbicross_flwr.storage.checkpoint_io import load_plain, save_plain

    payload = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": [np.float32(1.5), (1, "x")],
               "c": {"d": np.array([0.25, 0.5]), "e": None, "t": torch.ones(2)}}
    digest = save_plain(payload, tmp_path / "p.pt")
    back = load_plain(tmp_path / "p.pt", digest)
    assert np.array_equal(back["a"], payload["a"]) and back["a"].dtype == np.int64
    assert back["b"] == [1.5, (1, "x")] and np.array_equal(back["c"]["d"], payload["c"]["d"])
    assert back["c"]["e"] is None and torch.equal(back["c"]["t"], torch.ones(2))
