#!/usr/bin/env bash
# Start the federation's SuperLink with TLS and SuperNode authentication (foreground).
# One HTTPS port serves the sites (Fleet API), the operator's `flwr` (Control API) and the
# ServerApp. State (registered sites, runs) is kept in STATE_DIR/state.db.
#
# Usage: deploy/start_superlink.sh CERT_DIR STATE_DIR [HOST] [PORT]
#   CERT_DIR: from deploy/make_certificates.sh (ca.crt, server.pem, server.key)
#   HOST:     interface to listen on: 127.0.0.1 (default, this machine only) or 0.0.0.0
#   PORT:     default 9093
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
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" \
  --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$state/state.db" \
  --host "$host" --port "$port"
