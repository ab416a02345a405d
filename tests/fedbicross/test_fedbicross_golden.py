"""A tiny FedBiCross run keeps the values recorded at a commit known to be right, on every CPU.

The run goes through the run config (keys, not settings field names), clusters four seeded
tiny clients into K=2, synthesises, adapts the noise and runs two server epochs of bi-level KD
with a checkpoint folder. Its outputs are compared with ``golden_fedbicross.json`` with
tolerances that float rounding cannot cross but a real change does:

* the cluster assignment exactly;
* the cross-cluster weight history, the cluster models, the final synthetic images and the
  validation KD losses elementwise within ``|a - b| <= atol + rtol * |b|`` (:data:`TOLERANCE`),
  of which at most 1 % of the elements may lie outside (Adam's first steps are sign-like, so a
  pixel whose gradient is at rounding level may move by a whole step on another CPU).

On the recording CPU, summing in another order (1 thread against 2) moved no element outside
these bounds; a 1 % change of the synthesis or student rate, or of one client parameter,
moves 15-100 % of the elements of at least one quantity outside them
(:func:`test_the_comparison_fails_when_a_parameter_is_perturbed`).

Bit-exact digests are an optional per-machine check: ``python
tests/fedbicross/test_fedbicross_golden.py --record-digests FILE`` records them on one machine,
and ``FEDBICROSS_GOLDEN_DIGESTS=FILE`` makes :func:`test_bit_exact_digests_on_the_recording_machine`
compare against them there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross
from tests.tiny_models import make_tiny

GOLDEN = Path(__file__).with_name("golden_fedbicross.json")
# student-lr-milestones='' keeps eta_G constant, as every run did before the key existed.
KEYS = {"num-clusters": 2, "noise-samples": 8, "synth-steps": 3, "synth-batch": 8,
        "synth-lr": 0.1, "bn-weight": 0.1, "kmeans-n-init": 2, "server-epochs": 2,
        "student-lr-milestones": ""}
# quantity -> (rtol, atol)
TOLERANCE = {"weights": (1e-6, 1e-6), "val-loss": (1e-3, 1e-5), "cluster-models": (1e-4, 1e-6),
             "synthetic": (1e-4, 1e-5)}
MAX_OUTSIDE = 0.01  # share of elements allowed outside the bound


def tiny_run(checkpoint_dir: Path, keys: dict | None = None,
             client_offset: float = 0.0) -> tuple[dict, object]:
    """Values of one tiny run (see the module doc) and the raw result."""
    settings = FedBiCrossSettings.of(RunConfig.from_run_config({**KEYS, **(keys or {})}),
                                     num_examples=4)
    clients = [make_tiny(seed) for seed in range(4)]
    with torch.no_grad():
        clients[0].conv.weight[0, 0, 0, 0] += client_offset
    torch.manual_seed(0)
    result = run_fedbicross(clients, 1, 3, settings, "cpu", progress=False, image_size=6,
                            student_factory=lambda: make_tiny(99).train(),
                            checkpoint_dir=checkpoint_dir)
    values = {
        "assignment": result.assignment.tolist(),
        "weights": result.weight_history.ravel().tolist(),
        "val-loss": np.asarray(result.diagnostics["val_loss"]).ravel().tolist(),
        "cluster-models": [v for s in result.cluster_models for name in sorted(s)
                           for v in s[name].double().ravel().tolist()],
        "synthetic": [v for x in result.synthetic_examples for v in x.double().ravel().tolist()],
    }
    return values, result


def differences(values: dict, golden: dict) -> dict[str, float]:
    """Per quantity, the share of elements outside its tolerance (1.0 for a shape change)."""
    out = {"assignment": float(values["assignment"] != golden["assignment"])}
    for name, (rtol, atol) in TOLERANCE.items():
        a, b = np.asarray(values[name]), np.asarray(golden[name])
        out[name] = (1.0 if a.shape != b.shape
                     else float(np.mean(np.abs(a - b) > atol + rtol * np.abs(b))))
    return out


def test_a_tiny_fedbicross_run_keeps_its_recorded_values(tmp_path: Path) -> None:
    # Prepare
    golden = json.loads(GOLDEN.read_text())["values"]
    # Execute
    values, _ = tiny_run(tmp_path / "ckpt")
    # Assert
    assert any((tmp_path / "ckpt").iterdir()), "the run wrote no checkpoint file"
    shares = differences(values, golden)
    assert shares["assignment"] == 0.0, (values["assignment"], golden["assignment"])
    assert all(share <= MAX_OUTSIDE for share in shares.values()), shares


@pytest.mark.parametrize("change", [{"keys": {"synth-lr": 0.101}},
                                    {"keys": {"student-lr": 0.0101}},
                                    {"client_offset": 1e-2}],
                         ids=["synth-lr+1%", "student-lr+1%", "client-weight"])
def test_the_comparison_fails_when_a_parameter_is_perturbed(tmp_path: Path, change: dict) -> None:
    golden = json.loads(GOLDEN.read_text())["values"]
    values, _ = tiny_run(tmp_path / "ckpt", **change)
    shares = differences(values, golden)
    assert max(shares.values()) > 10 * MAX_OUTSIDE, shares


def _state_sha(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().double().numpy().tobytes())
    return digest.hexdigest()


def digests(checkpoint_dir: Path) -> dict:
    """Bit-exact sha256 digests of the tiny run (models, weights, synthetic images)."""
    _, result = tiny_run(checkpoint_dir)
    return {"cluster-models": [_state_sha(s) for s in result.cluster_models],
            "weights": hashlib.sha256(np.ascontiguousarray(result.weight_history,
                                                           dtype=np.float64)).hexdigest(),
            "synthetic": [hashlib.sha256(x.double().numpy().tobytes()).hexdigest()
                          for x in result.synthetic_examples]}


def test_bit_exact_digests_on_the_recording_machine(tmp_path: Path) -> None:
    path = os.environ.get("FEDBICROSS_GOLDEN_DIGESTS", "")
    if not path:
        pytest.skip("optional: set FEDBICROSS_GOLDEN_DIGESTS to a file recorded on this machine "
                    "with `python tests/fedbicross/test_fedbicross_golden.py --record-digests "
                    "FILE`")
    assert digests(tmp_path / "ckpt") == json.loads(Path(path).read_text())


if __name__ == "__main__":  # record, only at a commit known to be right
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if sys.argv[1:2] == ["--record-digests"]:
            Path(sys.argv[2]).write_text(json.dumps(digests(Path(tmp) / "d"), indent=1) + "\n")
        else:
            record = {"recorded": sys.argv[1] if len(sys.argv) > 1 else "",
                      "values": tiny_run(Path(tmp) / "v")[0]}
            GOLDEN.write_text(json.dumps(record) + "\n")
