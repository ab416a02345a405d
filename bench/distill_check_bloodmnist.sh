#!/usr/bin/env bash
# The distill-check curve and A/Bs on bloodmnist-pbc (docs/FINDINGS.md, "BloodMNIST: ..."):
# one central teacher (width 16, 5 epochs at lr 0.01), distilled by FedBiCross at
# conf/paper-cpu.toml's per-step values (T = 100, B = 64, a_BN 10, tau 20, student SGD 1e-3 /
# 0.9 / 5e-4 x0.1 at 50 % and 75 % of the epochs, the reference's carried train-mode noise
# teacher) for 1, 10, 30 and 100 server epochs, and one change at a time at 10 epochs.
#
#   bench/distill_check_bloodmnist.sh OUT DATA_DIR [ROW ...]
#
# One thread (num-threads=1): on 2 cores a second busy process makes a 2-thread run up to 20x
# slower (its threads spin at every barrier), while one thread keeps its pace beside other work.
# Each row appends to OUT/distill-check.csv and is listed in OUT/done.txt; rows listed there
# are skipped, and a row stopped half way resumes from its last finished server epoch (its run
# folder is OUT/<row>, resume=true), so the script resumes where it stopped. ROW names pick
# rows (default: all).
set -euo pipefail
out=$1 data=$2; shift 2
fedbicross=${FEDBICROSS:-fedbicross}
mkdir -p "$out"; touch "$out/done.txt"
base="dataset='bloodmnist-pbc' data-dir='$data' model-width=16 precision='auto' progress=true
 num-threads=1
 local-lr=0.01 batch-size=128 synth-steps=100 synth-batch=64 synth-lr=0.05 tv-weight=2.5e-5
 bn-weight=10.0 kd-temperature=20.0 student-lr=0.001 student-momentum=0.9
 student-weight-decay=5e-4 student-lr-milestones='0.5,0.75' noise-teacher-mode='train'
 noise-teacher-carry=true"
declare -A rows=(
  [e1]="server-epochs=1"
  [e10]="server-epochs=10"
  [e10-literal-teacher]="server-epochs=10 noise-teacher-mode='eval' noise-teacher-carry=false"
  [e10-lr0.01]="server-epochs=10 student-lr=0.01 student-lr-milestones=''"
  [e10-kd32]="server-epochs=10 kd-batch=32"
  [e10-bn0.1]="server-epochs=10 bn-weight=0.1"
  [e30]="server-epochs=30"
  [e100]="server-epochs=100"
)
order=(e1 e10 e10-literal-teacher e10-lr0.01 e10-kd32 e10-bn0.1 e30 e100)
[ $# -gt 0 ] && order=("$@")
for row in "${order[@]}"; do
  grep -qx "$row" "$out/done.txt" && { echo "skip $row (done)"; continue; }
  echo "=== $row: ${rows[$row]} ($(date -u +%FT%TZ))"
  # the row's keys replace the base's (a run config may not name a key twice)
  keys=$(for kv in ${rows[$row]}; do printf '%s\n' "${kv%%=*}"; done)
  config=$(for kv in $base; do grep -qx "${kv%%=*}" <<< "$keys" || printf '%s ' "$kv"; done)
  $fedbicross distill-check --dataset bloodmnist-pbc --synthesis fedbicross --teacher-epochs 5 \
    --out "$out" --run-config "$config ${rows[$row]} run-name='$row' resume=true"
  echo "$row" >> "$out/done.txt"
done
