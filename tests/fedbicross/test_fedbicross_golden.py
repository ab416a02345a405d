"""A tiny FedBiCross run matches the golden values recorded before the package was reorganised.

The run goes through the run config (keys, not settings field names), clusters four seeded
tiny clients into K=2, synthesises, adapts the noise and runs the bi-level KD with a
checkpoint folder. The final cluster models, the cross-cluster weights, the assignment and
the checkpoint payloads are hashed (sha256 of the float64 tensor bytes; a checkpoint's
tensors and numbers, without its wall-clock times) and compared against values recorded at
the commit before any module moved.

Bit-exact values depend on the CPU's kernels, so they are recorded per :func:`machine_key`:
``torch.backends.cpu.get_cpu_capability()`` (AVX2, AVX512, ...), with ``+AMX`` on a CPU with
AMX tiles, where oneDNN picks other kernels (also in float32). On a key with no recording the
test is skipped, naming how to record one at a commit known to be right.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fbc_models import make_tiny

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross

GOLDEN = Path(__file__).with_name("golden_fedbicross.json")
KEYS = {"num-clusters": 2, "noise-samples": 8, "synth-steps": 3, "synth-batch": 8,
        "synth-lr": 0.1, "bn-weight": 0.1, "kmeans-n-init": 2, "server-epochs": 2}


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float64).tobytes()).hexdigest()


def _state_sha(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().double().numpy().tobytes())
    return digest.hexdigest()


def _payload_sha(payload: object) -> str:
    """sha256 of a checkpoint payload: every tensor (float64 bytes) and value, in order,
    except wall-clock times (``times``, ``*_time_s``), which differ from run to run.
    """
    digest = hashlib.sha256()

    def walk(x: object, where: str) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                if k != "times" and not str(k).endswith("time_s"):
                    walk(x[k], f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        elif isinstance(x, torch.Tensor):
            digest.update(where.encode() + str(tuple(x.shape)).encode())
            digest.update(x.detach().cpu().double().numpy().tobytes())
        else:
            digest.update(f"{where}={x!r}".encode())

    walk(payload, "")
    return digest.hexdigest()


def machine_key() -> str:
    """The CPU kernels' family: torch's capability, ``+AMX`` where the CPU has AMX tiles."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return torch.backends.cpu.get_cpu_capability() + ("+AMX" if " amx_tile" in flags else "")


def tiny_run_digests(checkpoint_dir: Path) -> dict:
    """Digests of one tiny FedBiCross run with checkpoints in ``checkpoint_dir``."""
    settings = FedBiCrossSettings.of(RunConfig.from_run_config(KEYS), num_examples=4)
    clients = [make_tiny(seed) for seed in range(4)]
    torch.manual_seed(0)
    result = run_fedbicross(clients, 1, 3, settings, "cpu", progress=False, image_size=6,
                            student_factory=lambda: make_tiny(99).train(),
                            checkpoint_dir=checkpoint_dir)
    files = {p.name: _payload_sha(torch.load(p, map_location="cpu", weights_only=True))
             for p in sorted(checkpoint_dir.iterdir()) if p.suffix == ".pt"}
    return {"cluster-models": [_state_sha(s) for s in result.cluster_models],
            "weights": _sha(result.weight_history),
            "weights-shape": list(result.weight_history.shape),
            "assignment": result.assignment.tolist(),
            "synthetic": [_sha(x.numpy()) for x in result.synthetic_examples],
            "checkpoint-files": files}


def test_a_tiny_fedbicross_run_matches_the_golden_values(tmp_path: Path) -> None:
    # Prepare
    capability = machine_key()
    recorded = json.loads(GOLDEN.read_text())
    if capability not in recorded:
        pytest.skip(f"no golden values for CPU kernels {capability} (recorded: "
                    f"{sorted(recorded)}); record them with `python {__file__}` at a commit "
                    "known to be right")
    golden = recorded[capability]
    # Execute
    digests = tiny_run_digests(tmp_path / "ckpt")
    # Assert: bit-identical models, weights, assignment, synthetic images and checkpoints
    assert digests["checkpoint-files"], "the run wrote no checkpoint file"
    assert digests == golden


if __name__ == "__main__":  # record the golden values (only at a commit known to be right)
    import tempfile

    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        recorded[machine_key()] = tiny_run_digests(Path(tmp) / "ckpt")
    GOLDEN.write_text(json.dumps(recorded, indent=1) + "\n")
