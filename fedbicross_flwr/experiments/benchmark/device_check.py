"""Does a device compute what the CPU computes? One tiny FedBiCross server stage on each.

``run_fedbicross`` (clustering, synthesis, noise adaptation, soft labels, bi-level KD) runs
from the same seed and the same client models on the CPU and on the device, in float32 (TF32
off on CUDA). The device side runs compiled when asked (``compile``, ``compile-scope``); the
CPU side always eagerly, so the check also covers the compiled path. Compared:

* the cluster assignment: equal;
* the final synthetic images x^(T) of each cluster, relative error within ``DEVICE_RTOL``;
* the outputs of each trained cluster model G_k on fixed probe images (both on the CPU),
  relative error within ``DEVICE_RTOL``;
* the final cross-cluster weights, absolute error within ``DEVICE_RTOL``.

Two devices sum in different orders (other kernels), and the T Adam steps on the images carry
those rounding differences forward; on a tiny run they stay well below 1e-2. The CPU against
itself agrees exactly (the test of this check).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ...fedbicross.config import FedBiCrossSettings
from ...fedbicross.method import FedBiCrossResult, run_fedbicross
from ...model import load_resnet18
from .hardware import tf32_disabled
from .server_stage import BenchConfig, Check, make_clients, rel_err

DEVICE_RTOL = 1e-2


@dataclass(frozen=True)
class CheckSizes:
    """The tiny run of the check: N clients in K clusters, T steps of B images, M noise images."""

    clients: int = 5
    clusters: int = 2
    batch: int = 16
    steps: int = 4
    width: int = 16
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    noise_samples: int = 32


TINY_CHECK = CheckSizes(clients=3, clusters=2, batch=8, steps=2, width=4, image_size=8,
                        num_classes=3, noise_samples=8)


def tiny_run(sizes: CheckSizes, seed: int, device: torch.device, compile_: bool = False,
             compile_scope: str = "synthesis") -> FedBiCrossResult:
    """One float32 server stage on ``device`` from the seeded clients of ``sizes``."""
    cfg = BenchConfig(num_clients=sizes.clients, num_clusters=sizes.clusters, batch=sizes.batch,
                      steps=sizes.steps, model="resnet18", in_channels=sizes.in_channels,
                      num_classes=sizes.num_classes, image_size=sizes.image_size,
                      width=sizes.width, seed=seed, device="cpu", check=False)
    clients = make_clients(cfg, torch.device("cpu"))
    settings = FedBiCrossSettings(num_clusters=sizes.clusters, noise_samples=sizes.noise_samples,
                                  synth_steps=sizes.steps, synth_batch=sizes.batch, seed=seed,
                                  precision="fp32", num_examples=sizes.batch,
                                  compile=compile_, compile_scope=compile_scope)
    with tf32_disabled():
        return run_fedbicross(clients, sizes.in_channels, sizes.num_classes, settings, device,
                              progress=False, image_size=sizes.image_size)


@torch.no_grad()
def compare_runs(run: FedBiCrossResult, cpu: FedBiCrossResult, probe: torch.Tensor
                 ) -> list[Check]:
    """The checks of the module docstring: ``run`` (the device's) against ``cpu``.

    ``probe`` are the (n, C_in, H, W) images both runs' cluster models are evaluated on, on
    the CPU in eval mode.
    """
    checks = [Check("cluster assignment (clients assigned differently)",
                    {"clients": float(np.sum(run.assignment != cpu.assignment))}, 0.0)]
    for k, (a, b) in enumerate(zip(run.synthetic_examples, cpu.synthetic_examples)):
        checks.append(Check(f"synthetic images x^(T), cluster {k}",
                            {"rel_err": rel_err(a, b)}, DEVICE_RTOL))
    for k, states in enumerate(zip(run.cluster_models, cpu.cluster_models)):
        out_a, out_b = (load_resnet18(state).eval()(probe) for state in states)
        checks.append(Check(f"cluster model G_{k} outputs on probe images",
                            {"rel_err": rel_err(out_a, out_b)}, DEVICE_RTOL))
    weights = float(np.abs(run.weight_history[-1] - cpu.weight_history[-1]).max())
    checks.append(Check("final cross-cluster weights (abs err)", {"abs_err": weights},
                        DEVICE_RTOL))
    return checks


def device_check(device: torch.device, sizes: CheckSizes, seed: int = 0,
                 compile_: bool = False, compile_scope: str = "synthesis") -> dict[str, Any]:
    """Run the tiny server stage on the CPU and on ``device`` and compare (module docstring).

    Returns
    -------
    dict
        'device', 'sizes', 'rtol', 'compile', 'compile_scope', 'checks' (each: name, error,
        tolerance, passed) and 'passed'.
    """
    cpu = tiny_run(sizes, seed, torch.device("cpu"))
    other = tiny_run(sizes, seed, device, compile_, compile_scope)
    gen = torch.Generator().manual_seed(seed + 11)
    probe = torch.randn(16, sizes.in_channels, sizes.image_size, sizes.image_size, generator=gen)
    checks = compare_runs(other, cpu, probe)
    rows = [{"name": c.name, "error": c.max_error, "tolerance": c.rtol, "passed": c.passed}
            for c in checks]
    return {"device": str(device), "sizes": asdict(sizes), "rtol": DEVICE_RTOL,
            "compile": compile_, "compile_scope": compile_scope, "checks": rows,
            "passed": all(c.passed for c in checks)}


def format_check(check: dict[str, Any]) -> str:
    """Readable lines of a :func:`device_check` result."""
    s = check["sizes"]
    mode = f"compiled ({check['compile_scope']})" if check["compile"] else "eager"
    lines = [f"device check: {check['device']} ({mode}) against cpu (eager), float32, "
             f"N={s['clients']} K={s['clusters']} B={s['batch']} T={s['steps']} "
             f"width {s['width']}, {s['image_size']}x{s['image_size']} images"]
    for row in check["checks"]:
        lines.append(f"  {'PASS' if row['passed'] else 'FAIL'} {row['name']}: "
                     f"{row['error']:.2e} <= {row['tolerance']:g}")
    lines.append(f"device check passed: {check['passed']}")
    return "\n".join(lines)
