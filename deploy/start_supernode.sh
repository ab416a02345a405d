#!/usr/bin/env bash
# Start one site's SuperNode (foreground): TLS to the SuperLink, authenticated by the site's
# private key, with the site's own data archive and the folder where it keeps its
# personalized model (personalized-run<RUN_ID>.pt). Nothing but model arrays and metrics
# leaves the site.
#
# Usage: deploy/start_supernode.sh SUPERLINK CA_CERT PRIVATE_KEY DATA_PATH PARTITION_ID \
#                                  OUTPUT_DIR [RUNTIME_PORT]
#   SUPERLINK:    host:port of the SuperLink, e.g. 127.0.0.1:9093
#   DATA_PATH:    absolute path of the site's MedMNIST-format npz (train_*, test_*, optional val_*)
#   PARTITION_ID: the site's stable number in the results (0, 1, ...)
#   RUNTIME_PORT: local port of this SuperNode's ClientApp API (default 9094); two SuperNodes
#                 on one machine need different ports
# Environment: PINNED_APPS=<file> runs only the pinned app bundles (see below).
set -euo pipefail

if [[ $# -lt 6 ]]; then
  echo "usage: $0 SUPERLINK CA_CERT PRIVATE_KEY DATA_PATH PARTITION_ID OUTPUT_DIR [RUNTIME_PORT]" >&2
  exit 2
fi
superlink="$1"; ca="$2"; key="$3"; data="$4"; pid="$5"; out="$6"; port="${7:-9094}"
mkdir -p "$out"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
# PINNED_APPS (optional): a file of the sha256s of the app bundles this site has reviewed
# (`python -m fedbicross_flwr.deploy.supernode_gate hash <reviewed checkout>`); any other bundle the
# operator ships is refused at the site, and the site's log names its hash.
if [[ -n "${PINNED_APPS:-}" ]]; then
  flower_supernode="$(command -v flower-supernode)" || {
    echo "error: flower-supernode not found; activate the project's venv" >&2; exit 1; }
  launcher=("${PYTHON:-$(dirname "$flower_supernode")/python}" -m fedbicross_flwr.deploy.supernode_gate
            --pinned-apps "$PINNED_APPS")
else
  launcher=(flower-supernode)
fi
exec "${launcher[@]}" \
  --superlink "$superlink" \
  --root-certificates "$ca" \
  --auth-supernode-private-key "$key" \
  --port "$port" \
  --node-config "data-path='$data' partition-id=$pid output-dir='$out'"
