"""Where a server-stage step spends its CPU time: torch.profiler top operators of one stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_stages.py synthesis     # 2 members, B=64
    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_stages.py noise         # 1 member, T=4, B=64
    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_stages.py bilevel       # K=2, T=3, B=64
    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_stages.py conv-shapes   # one member's
                                               # forward + image gradient, by input shape

bf16 autocast and channels-last as in the real path; seeded ResNet-18s. Quoted in
docs/BENCHMARKS.md ("Every stage is now convolution-bound").
"""
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fedbicross_flwr.benchmark.server_stage import BenchConfig, _settings, _student_factory
from fedbicross_flwr.fedbicross.bilevel import OnlineBilevelTrainer, fixed_weights
from fedbicross_flwr.fedbicross.losses import BNStatsHook
from fedbicross_flwr.fedbicross.method import init_cluster_models
from fedbicross_flwr.fedbicross.noise_adapt import noise_adapted_copy
from fedbicross_flwr.model import build_resnet18

torch.manual_seed(0)
CL = torch.channels_last


def member() -> torch.nn.Module:
    model = build_resnet18(1, 10).train()
    with torch.no_grad():  # BN statistics away from the initialisation
        for _ in range(2):
            model(torch.randn(64, 1, 28, 28))
    return model.eval().requires_grad_(False).to(memory_format=CL)


def synthesis_step(members, x, y):
    with BNStatsHook(members) as hook:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            log_p = torch.stack([m(x).float() for m in members]).log_softmax(2).logsumexp(0)
        loss = F.nll_loss(log_p, y) + 0.01 * hook.loss()
    loss.backward(inputs=[x])


stage = sys.argv[1] if len(sys.argv) > 1 else "synthesis"
x = torch.randn(64, 1, 28, 28).contiguous(memory_format=CL).requires_grad_(True)
y = torch.randint(0, 10, (64,))
if stage in ("synthesis", "conv-shapes"):
    members = [member() for _ in range(2 if stage == "synthesis" else 1)]

    def work():
        synthesis_step(members, x, y)
elif stage == "noise":
    one = member()
    trajectory = torch.stack([t.contiguous(memory_format=CL) for t in torch.randn(4, 64, 1, 28, 28)])

    def work():
        noise_adapted_copy([one], trajectory, 0.1, "eval", "bf16")
elif stage == "bilevel":
    cfg = BenchConfig(num_clients=5, num_clusters=2, batch=64, steps=3)
    students = init_cluster_models(_student_factory(cfg), 2, 0, torch.device("cpu"))
    trajectories = [torch.randn(3, 64, 1, 28, 28) for _ in range(2)]
    probs = [torch.softmax(torch.randn(3, 64, 10), -1) for _ in range(2)]
    trainer = OnlineBilevelTrainer(students, _settings(cfg), fixed_weights("bilevel", 2),
                                   torch.device("cpu"))

    def work():
        trainer.run_epoch(trajectories, probs, probs, progress=False)
else:
    raise SystemExit(f"unknown stage {stage!r}")

work()  # warm-up
by_shape = stage == "conv-shapes"
with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
    work()
table = prof.key_averages(group_by_input_shape=by_shape)
print(table.table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=32,
                  max_shapes_column_width=60))
