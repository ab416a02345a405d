"""Bi-level step time of the current code against the bilevel.py of another commit, alternating.

    .venv/bin/python bench/bilevel_ab.py 9699a87        # 5 rounds, K=2, B=64, T=4, bf16

The other commit's ``fedbicross_flwr/fedbicross/bilevel.py`` is read with ``git show`` and
imported as a module beside the current one (its relative imports resolved to the current
package). Both trainers start from the same students and run the same T steps on the same
random trajectories and soft labels; the rounds alternate old/new so that drifting machine load
hits both. Prints ms per step per round and the relative difference of the two codes' student
updates in float64 and float32. Quoted in docs/BENCHMARKS.md.
"""
import copy
import dataclasses
import statistics
import subprocess
import sys
import time
import types

import torch

from fedbicross_flwr.benchmark.server_stage import BenchConfig, _settings, _student_factory
from fedbicross_flwr.fedbicross import bilevel as current
from fedbicross_flwr.fedbicross.method import init_cluster_models

rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
source = subprocess.run(["git", "show", f"{rev}:fedbicross_flwr/fedbicross/bilevel.py"],
                        check=True, capture_output=True, text=True).stdout
old = types.ModuleType("fedbicross_flwr.fedbicross.bilevel_old")
old.__package__ = "fedbicross_flwr.fedbicross"
sys.modules[old.__name__] = old  # dataclasses look their module up
exec(compile(source, f"{rev}:bilevel.py", "exec"), old.__dict__)

torch.manual_seed(0)
T = 4
cfg = BenchConfig(num_clients=5, num_clusters=2, batch=64, steps=T)
base = init_cluster_models(_student_factory(cfg), 2, 0, torch.device("cpu"))
trajectories = [torch.randn(T, 64, 1, 28, 28) for _ in range(2)]
probs = [torch.softmax(3 * torch.randn(T, 64, 10), -1) for _ in range(2)]


def run(module, precision="bf16", dtype=torch.float32, steps=T):
    start_models = [copy.deepcopy(s).to(dtype) for s in base]
    students = [copy.deepcopy(s) for s in start_models]
    settings = dataclasses.replace(_settings(cfg), mixed_precision=precision)
    trainer = module.OnlineBilevelTrainer(students, settings, module.fixed_weights("bilevel", 2),
                                          torch.device("cpu"))
    start = time.perf_counter()
    trainer.run_epoch([t[:steps].to(dtype) for t in trajectories],
                      [p[:steps].to(dtype) for p in probs], [p[:steps].to(dtype) for p in probs],
                      progress=False)
    update = torch.cat([(a - b).detach().flatten() for s, s0 in zip(students, start_models)
                        for a, b in zip(s.parameters(), s0.parameters())])
    return 1e3 * (time.perf_counter() - start) / steps, update


run(current), run(old)  # warm-up
times = {rev: [], "current": []}
for _ in range(rounds):
    times[rev].append(run(old)[0])
    times["current"].append(run(current)[0])
for name, values in times.items():
    print(f"{name}: ms per bi-level step {[round(v) for v in values]}, "
          f"median {statistics.median(values):.0f}")
# Same mathematics: in float64 the two codes give the same student updates to rounding. (In
# float32 they drift apart over a few steps: rounding differences grow through the momentum,
# train-mode BN and unit-normalised hypergradient steps.)
for dtype, steps in ((torch.float64, 2), (torch.float32, 1), (torch.float32, T)):
    (_, a), (_, b) = run(old, "none", dtype, steps), run(current, "none", dtype, steps)
    print(f"{str(dtype)[6:]} student updates after {steps} step(s), current vs {rev}: relative "
          f"difference {float((b - a).norm() / a.norm()):.1e}")
