#!/usr/bin/env bash
# One prepared device session (docs/BENCHMARKS.md "GPU", docs/RESULTS.md "Paper-scale cell").
#   bash bench/gpu_session.sh smoke   # ~1 min: every step below at toy size
#   bash bench/gpu_session.sh full    # the measurements (run 2026-11-26, H100)
#   bash bench/gpu_session.sh next    # prepared for the next device session (not run yet)
# Runs from the repository root on the lent GPU machine (no flwr, Ray, medmnist or
# flwr-datasets there: the package is used from the source tree, partitions are replayed by
# bench/device_run.py). Writes logs and a tarball of the run folders to $OUT (or ./gpu-out).
set -u -o pipefail
MODE=${1:-smoke}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV=${DEV:-cuda}
RUNS=/tmp/fbc-runs
CACHE=/tmp/fbc-cache
mkdir -p "$RUNS" "$CACHE"

nvidia-smi -L 2>&1 | tee "$OUT/env.log"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  2>&1 | tee -a "$OUT/env.log"

step() {  # step NAME TIMEOUT CMD... : run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc wall=$((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/$name.log"
}

CLI="$PY bench/device_run.py cli"
if [ "$MODE" = smoke ]; then
  step bench 120 $CLI bench --device "$DEV" --clients 5 --clusters 2 --batch 16 --steps 3 \
    --ref-steps 1 --dtype bf16 --json "$OUT/bench.json"
  step cell 240 $CLI run --preset conf/paper.toml --client-cache "$CACHE" --methods \
    fedavg1,fedbicross,fedisca --run-config "dataset='digits' output-dir='$RUNS' \
    local-epochs=1 pers-epochs=1 synth-steps=4 synth-batch=16 noise-samples=16 fedisca-epochs=1 \
    run-name='smoke'"
elif [ "$MODE" = next ]; then
  # Issue 6: does torch.compile of the synthesis members (run-config compile) lift the paper
  # stage's 5.3 % of peak? Same inputs, T=20, with and without --compile.
  step bench_paper_t20 90 $CLI bench --device "$DEV" --clients 5 --clusters 2 --batch 256 \
    --steps 20 --ref-steps 2 --dtype bf16 --json "$OUT/bench_paper_t20.json"
  step bench_paper_t20_compile 150 $CLI bench --device "$DEV" --clients 5 --clusters 2 \
    --batch 256 --steps 20 --ref-steps 2 --dtype bf16 --compile \
    --json "$OUT/bench_paper_t20_compile.json"
  # Issue 3: the BN prior's weight at paper scale (the CPU probe: a_BN=1 made server KD improve
  # the cluster average, a_BN=0.01 made it worse), with the smaller student step.
  for BW in 10 1 0.1; do
    step "cell_bn$BW" 150 $CLI run --preset conf/paper.toml --client-cache "$CACHE" --methods \
      fedbicross --run-config "dataset='digits' output-dir='$RUNS' bn-weight=$BW \
      student-lr=0.001 student-init='cluster-average' run-name='gpu-paper-digits-s0-bn$BW'"
  done
else
  # Issue 6: the paper's server stage (N=5, K=2, B=256, T=500, one server epoch) against the
  # reference-style path on the same inputs.
  step bench_paper 150 $CLI bench --device "$DEV" --clients 5 --clusters 2 --batch 256 \
    --steps 500 --ref-steps 5 --dtype bf16 --json "$OUT/bench_paper.json"
  # Issue 4: the paper-scale digits cell (N=5, alpha 0.1, seed 0; paper T, B, client epochs).
  step cell_paper 170 $CLI run --preset conf/paper.toml --client-cache "$CACHE" --methods \
    fedavg1,local,fedbicross --run-config "dataset='digits' output-dir='$RUNS' \
    run-name='gpu-paper-digits-a0.1-s0'"
  tar -czf "$OUT/runs.tgz" -C "$RUNS" . 2>/dev/null
  step cell_fedisca 80 $CLI run --preset conf/paper.toml --client-cache "$CACHE" --methods \
    fedisca --run-config "dataset='digits' output-dir='$RUNS' fedisca-epochs=3 \
    run-name='gpu-paper-digits-a0.1-s0'"
  tar -czf "$OUT/runs.tgz" -C "$RUNS" . 2>/dev/null
  # Issue 6: how the server stage grows with N (T=10 steps, B=256).
  step scaling_clients 60 $CLI bench --device "$DEV" --clusters 2 --batch 256 --steps 10 \
    --no-check --dtype bf16 --scaling clients=5,10,20,50,100 --plot "$OUT/scaling_clients.png"
  # Issue 3 (guidance only, not the CPU result): the CPU preset with 3 server epochs.
  step cell_cpu_e3 60 $CLI run --preset conf/cpu.toml --client-cache "$CACHE" --methods \
    fedavg1,local,fedbicross --run-config "dataset='digits' output-dir='$RUNS' server-epochs=3 \
    run-name='gpu-cpupreset-digits-a0.1-s0-e3'"
fi
tar -czf "$OUT/runs.tgz" -C "$RUNS" . 2>/dev/null
ls -la "$OUT"
