"""A server-stage checkpoint whose checksum matches but whose content does not fit the run.

Each case takes the checkpoints a real tiny run wrote, alters one file and rewrites its
sha256 in the manifest (as anyone who can write the folder can). The resumed run must not
raise: the file is named in one warning line, set aside as ``<name>.bad``, its stage is
recomputed and the result equals a clean run's; a second resume finds nothing to refuse.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fedbicross_flwr.storage.checkpoint_io import load_plain, save_plain
from tests.fedbicross.test_fedbicross_checkpoint import TINY, _assert_same, _run
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def clean():
    return _run()


@pytest.fixture
def finished(tmp_path):
    """The checkpoint folder of a finished tiny run: clustering.pt and epoch1-bilevel.pt."""
    folder = tmp_path / "ckpt"
    _run(folder)
    return folder


def _rewrite(folder, name, change) -> None:
    """Load checkpoint ``name`` with the real reader, ``change`` it in place, save it with the
    real writer and record its new sha256 in the manifest.
    """
    manifest = json.loads((folder / "manifest.json").read_text())
    payload = load_plain(folder / f"{name}.pt", manifest["files"][name])
    change(payload)
    manifest["files"][name] = save_plain(payload, folder / f"{name}.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _manifest(change):
    def tamper(folder) -> str:
        path = folder / "manifest.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
        return "manifest.json"
    return tamper


def _payload(name, change):
    def tamper(folder) -> str:
        _rewrite(folder, name, change)
        return f"{name}.pt"
    return tamper


def _assignment_out_of_range(payload) -> None:
    payload["assignment"][0] = 2  # K = 2: clusters are 0 and 1


def _wrong_shape(payload) -> None:
    payload["students"][0]["fc.weight"] = torch.zeros(3, 8)  # the cluster model's is (3, 4)


def _students_times_1e3(payload) -> None:
    for state in payload["students"]:
        for name, value in state.items():
            if value.is_floating_point():
                state[name] = value * 1e3


CASES = {  # what a probe of the resume found (with the checksum rewritten), and what it raised
    "manifest-is-a-list": (_manifest(lambda m: []), "AttributeError"),
    "manifest-files-is-a-string": (_manifest(lambda m: {**m, "files": "clustering"}),
                                   "ValueError"),
    "assignment-out-of-range": (_payload("clustering", _assignment_out_of_range),
                                "IndexError"),
    "assignment-missing": (_payload("clustering", lambda p: p.pop("assignment")), "KeyError"),
    "bilevel-wrong-shape": (_payload("epoch1-bilevel", _wrong_shape), "RuntimeError"),
    "students-times-1e3": (_payload("epoch1-bilevel", _students_times_1e3),
                           "a model far from a clean run's"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_checkpoint_that_does_not_fit_the_run_is_set_aside_and_recomputed(
        case, finished, clean, caplog) -> None:
    # Prepare: a finished run's checkpoints, one file altered with a matching checksum
    tamper, _ = CASES[case]
    name = tamper(finished)
    altered = (finished / name).read_bytes()
    # Execute: resume (no exception may escape)
    with caplog.at_level(logging.WARNING):
        resumed = _run(finished)
    # Assert: one line names the file; it is kept aside, never read again; same numbers
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
             and str(finished / name) in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], caplog.text
    assert f"set aside as {name}.bad" in lines[0]
    assert (finished / f"{name}.bad").read_bytes() == altered
    _assert_same(resumed, clean)
    # A second resume restores the recomputed stages and refuses nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = _run(finished)
    assert "set aside" not in caplog.text
    _assert_same(again, clean)


def test_the_untampered_checkpoints_are_restored_not_recomputed(finished, clean, caplog,
                                                                 monkeypatch) -> None:
    # the checks accept what the run itself wrote (else every case above would pass vacuously)
    import fedbicross_flwr.fedbicross.method as method_module

    calls = []
    monkeypatch.setattr(method_module, "noise_predictions", lambda *a, **k: calls.append(1))
    with caplog.at_level(logging.WARNING):
        resumed = _run(finished)
    assert calls == [] and "set aside" not in caplog.text
    _assert_same(resumed, clean)


def test_a_cluster_checkpoint_with_out_of_range_labels_is_recomputed(tmp_path, clean, caplog,
                                                                     monkeypatch) -> None:
    # Prepare: a run stopped in server epoch 2 keeps epoch 2's synthesis checkpoints
    from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer

    original = OnlineBilevelTrainer.run_epoch
    calls = []

    def stop_in_epoch_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "ckpt")
    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", original)
    _rewrite(tmp_path / "ckpt", "epoch1-cluster0",
             lambda p: p["labels"].__setitem__(0, 7))  # C = 3
    # Execute
    with caplog.at_level(logging.WARNING):
        resumed = _run(tmp_path / "ckpt")
    # Assert
    assert "epoch1-cluster0.pt does not hold what this run computes: ['labels'] holds 7, " \
           "outside [0, 2]" in caplog.text
    assert (tmp_path / "ckpt" / "epoch1-cluster0.pt.bad").is_file()
    _assert_same(resumed, clean)


def test_the_student_probe_sees_the_scaled_models() -> None:
    # the x1e3 case is refused by the forward probe, not by a finite-value check
    from fedbicross_flwr.model import forward_problem

    model = make_tiny(99)
    assert forward_problem(model, 1, 6) is None
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.mul_(1e3)
    assert "above the bound" in forward_problem(model, 1, 6)
    assert np.isfinite([p.detach().numpy() for p in model.parameters()][0]).all()


VARIANTS = {  # settings whose checkpoints hold other parts or other dtypes
    "carried-train-mode-noise-teacher": ({"noise_teacher_carry": True,
                                          "noise_teacher_mode": "train"}, torch.float32),
    "two-kd-passes-half-batches": ({"kd_passes": 2, "kd_batch": 4}, torch.float32),
    "no-momentum-similarity-weights": ({"student_momentum": 0.0,
                                        "weights_mode": "similarity"}, torch.float32),
    "float64-clients": ({}, torch.float64),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_checkpoints_of_every_variant_are_accepted(variant, tmp_path, monkeypatch,
                                                       caplog) -> None:
    # Prepare: a run stopped in server epoch 2 (epoch 1's state and epoch 2's synthesis kept)
    import fedbicross_flwr.fedbicross.method as method_module
    from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer
    from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
    from fedbicross_flwr.fedbicross.method import run_fedbicross

    overrides, dtype = VARIANTS[variant]

    def run():
        clients = [make_tiny(seed, dtype=dtype) for seed in range(4)]
        return run_fedbicross(clients, 1, 3, FedBiCrossSettings(**{**TINY, **overrides}), "cpu",
                              progress=False, image_size=6,
                              student_factory=lambda: make_tiny(99, dtype=dtype).train(),
                              checkpoint_dir=tmp_path / "ckpt")

    original = OnlineBilevelTrainer.run_epoch
    calls = []

    def stop_in_epoch_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * overrides.get("kd_passes", 1):
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(OnlineBilevelTrainer, "run_epoch", original)
    synthesis = []
    real = method_module.synthesize_trajectory
    monkeypatch.setattr(method_module, "synthesize_trajectory",
                        lambda *a, **k: synthesis.append(1) or real(*a, **k))
    # Execute
    with caplog.at_level(logging.WARNING):
        run()
    # Assert: every checkpoint restored, none refused
    assert "set aside" not in caplog.text and "recomputing" not in caplog.text
    assert synthesis == []


def test_a_manifest_that_is_a_folder_is_set_aside(finished, clean, caplog) -> None:
    # a folder (or a FIFO, a device) is never read: it could block the resume
    (finished / "manifest.json").unlink()
    (finished / "manifest.json").mkdir()
    with caplog.at_level(logging.WARNING):
        resumed = _run(finished)
    assert f"checkpoint manifest {finished / 'manifest.json'} is refused: it is not a regular " \
           "file; set aside as manifest.json.bad" in caplog.text
    assert (finished / "manifest.json.bad").is_dir() and (finished / "manifest.json").is_file()
    _assert_same(resumed, clean)
