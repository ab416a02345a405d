#!/usr/bin/env bash
# A `flwr run` simulation on an existing two-node Ray cluster, both nodes on this machine.
#
#   bash bench/ray_loopback.sh [extra --run-config overrides]
#
# 1. `ray start --head` (node 1, 1 CPU) and `ray start --address` (node 2, 1 CPU), with their own
#    RAY_TMPDIR so that no other Ray instance on the machine is touched or auto-detected;
# 2. `fedbicross simulate` (flwr run + SuperLink, isolated FLWR_HOME) with RAY_ADDRESS set, so
#    Flower's simulation engine calls ray.init() against that cluster instead of starting one;
# 3. `ray status` while the run is going (both nodes' CPUs in use);
# 4. every process of this cluster stopped by PID (SIGTERM, then SIGKILL), never `ray stop`,
#    which would stop all Ray processes of the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="$(pwd)/.venv/bin"
RAY_DIR="$(mktemp -d /tmp/fbc-ray.XXXXXX)"
PORT="${RAY_PORT:-6391}"
ADDR="127.0.0.1:${PORT}"
export RAY_USAGE_STATS_ENABLED=0

cluster_pids() {  # processes started by this script's `ray start` (they carry RAY_TMPDIR)
  "$VENV_BIN/python" - "$RAY_DIR" <<'PY'
import os, sys
marker = f"RAY_TMPDIR={sys.argv[1]}".encode()
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
        try:
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            print(entry)
PY
}

stop_cluster() {
  local pids
  pids="$(cluster_pids)"
  echo "== stopping Ray cluster processes by PID: $(echo $pids | tr '\n' ' ')"
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
  for _ in $(seq 1 20); do [ -z "$(cluster_pids)" ] && break; sleep 0.5; done
  pids="$(cluster_pids)"
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  echo "== left after stop: $(cluster_pids | wc -l) processes"
  rm -rf "$RAY_DIR"
}
# `flwr run` with a fresh FLWR_HOME talks to the local SuperLink at 127.0.0.1:39091 and starts
# one only if none listens there: a SuperLink of someone else would receive this run instead.
if ! "$VENV_BIN/python" -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', 39091)) == 0)"; then
  echo "a SuperLink already listens on 127.0.0.1:39091 (another run): try again later"; exit 1
fi
trap stop_cluster EXIT

echo "== head node"
RAY_TMPDIR="$RAY_DIR" "$VENV_BIN/ray" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
  --num-cpus=1 --num-gpus=0 --include-dashboard=false --disable-usage-stats || exit 1
echo "== second node (worker) on the same machine"
RAY_TMPDIR="$RAY_DIR" "$VENV_BIN/ray" start --address="$ADDR" --node-ip-address=127.0.0.1 \
  --num-cpus=1 --num-gpus=0 --disable-usage-stats || exit 1
sleep 2
"$VENV_BIN/ray" status --address="$ADDR"

( sleep "${STATUS_AFTER:-45}"; echo "== ray status during the run"; \
  "$VENV_BIN/ray" status --address="$ADDR"; \
  echo "== ClientApp actors and the raylet (node) that started each (PID PARENT COMMAND)"; \
  for pid in $(cluster_pids); do \
    ps -o pid=,ppid=,args= -p "$pid" | grep -E "raylet/raylet|ClientAppActor" | cut -c1-80; \
  done ) &
WATCH=$!
echo "== flwr run (fedbicross simulate) against RAY_ADDRESS=$ADDR"
RAY_ADDRESS="$ADDR" "$VENV_BIN/fedbicross" simulate --preset conf/smoke.toml --num-supernodes 2 \
  --run-config "num-clients=2 method='fedavg1' progress=false run-name='ray-loopback' ${1:-}" --timeout "${TIMEOUT:-1800}"
RC=$?
kill "$WATCH" 2>/dev/null
echo "== simulate exit code $RC"
exit $RC
