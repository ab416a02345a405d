#!/usr/bin/env bash
# Start the federation's SuperLink with TLS and SuperNode authentication (foreground).
# One HTTPS port serves the sites (Fleet API), the operator's `flwr` (Control API) and the
# ServerApp (Runtime API). Flower's flower-superlink is started through
# fedbicross_flwr.deploy.superlink_gate: only the Fleet API and /health answer every client; the
# Control and Runtime APIs answer only clients in OPERATOR_NETWORKS (default: loopback, i.e.
# `flwr` on this machine or through an SSH tunnel to it) and refuse everyone else (HTTP 403).
# State (registered sites, runs) is kept in STATE_DIR/state.db.
#
# Usage: [OPERATOR_NETWORKS=CIDR,...] deploy/start_superlink.sh CERT_DIR STATE_DIR [HOST] [PORT]
#   CERT_DIR: from deploy/make_certificates.sh (ca.crt, server.pem, server.key)
#   HOST:     interface to listen on: 127.0.0.1 (default, this machine only), 0.0.0.0, or
#             one IP address of this machine (an IP, not a name: the gate admits the
#             SuperLink's own ServerApp by that address)
#   PORT:     default 9093
#   OPERATOR_NETWORKS: client addresses allowed to use the Control API (default
#             127.0.0.0/8,::1/128); sites must never be in them
# The app's dependencies must already be installed here (no `uv sync` at run time), and the
# ServerApp writes its run folders to the run config's absolute output-dir on this machine.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CERT_DIR STATE_DIR [HOST] [PORT]" >&2
  exit 2
fi
certs="$1"; state="$2"; host="${3:-127.0.0.1}"; port="${4:-9093}"
mkdir -p "$state"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
flower_superlink="$(command -v flower-superlink)" || {
  echo "error: flower-superlink not found; activate the project's venv" >&2; exit 1; }
python="${PYTHON:-$(dirname "$flower_superlink")/python}"  # the interpreter flwr lives in
exec "$python" -m fedbicross_flwr.deploy.superlink_gate \
  --operator-networks "${OPERATOR_NETWORKS:-127.0.0.0/8,::1/128}" \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" \
  --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$state/state.db" \
  --host "$host" --port "$port"
