#!/usr/bin/env bash
# Start one site's SuperNode (foreground): TLS to the SuperLink, authenticated by the site's
# private key, with the site's own data archive and the folder where it keeps its
# personalized model (personalized-run<RUN_ID>.pt). Nothing but model arrays and metrics
# leaves the site.
#
# Usage: PINNED_APPS=<file> deploy/start_supernode.sh SUPERLINK CA_CERT PRIVATE_KEY DATA_PATH \
#                                  PARTITION_ID OUTPUT_DIR [RUNTIME_PORT]
#        deploy/start_supernode.sh --allow-any-app SUPERLINK ...   (no pins: any app runs)
#   SUPERLINK:    host:port of the SuperLink, e.g. 127.0.0.1:9093
#   DATA_PATH:    absolute path of the site's MedMNIST-format npz (train_*, test_*, optional val_*)
#   PARTITION_ID: the site's stable number in the results (0, 1, ...)
#   RUNTIME_PORT: local port of this SuperNode's ClientApp API (default 9094); two SuperNodes
#                 on one machine need different ports
# PINNED_APPS=<file> (required): the sha256s of the app bundles this site has reviewed, one
# per line (`python -m fedbicross_flwr.deploy.supernode_gate hash <reviewed checkout>`); any
# other bundle the operator ships is refused at the site, and the site's log names its hash.
# An unset or empty PINNED_APPS, or a pin file that is missing or malformed, refuses to start.
# --allow-any-app (first argument) starts a SuperNode that runs whatever app the operator ships
# (a test federation); it says so in its log.
set -euo pipefail

allow_any=0
if [[ "${1:-}" == "--allow-any-app" ]]; then
  allow_any=1; shift
fi
if [[ $# -lt 6 ]]; then
  echo "usage: PINNED_APPS=<file> $0 [--allow-any-app] SUPERLINK CA_CERT PRIVATE_KEY DATA_PATH PARTITION_ID OUTPUT_DIR [RUNTIME_PORT]" >&2
  exit 2
fi
pinned="${PINNED_APPS:-}"
if [[ -n "${pinned//[[:space:]]/}" && $allow_any == 1 ]]; then
  echo "error: give PINNED_APPS or --allow-any-app, not both" >&2; exit 2
elif [[ -n "${pinned//[[:space:]]/}" ]]; then
  gate=(--pinned-apps "$pinned")
elif [[ $allow_any == 1 ]]; then
  gate=(--allow-any-app)
else
  echo "error: PINNED_APPS is not set (or empty): set it to the file of the sha256s of the app bundles this site reviewed, or pass --allow-any-app to run any app the operator ships" >&2
  exit 2
fi
superlink="$1"; ca="$2"; key="$3"; data="$4"; pid="$5"; out="$6"; port="${7:-9094}"
flower_supernode="$(command -v flower-supernode)" || {
  echo "error: flower-supernode not found; activate the project's venv" >&2; exit 1; }
mkdir -p "$out"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
exec "${PYTHON:-$(dirname "$flower_supernode")/python}" -m fedbicross_flwr.deploy.supernode_gate \
  "${gate[@]}" \
  --superlink "$superlink" \
  --root-certificates "$ca" \
  --auth-supernode-private-key "$key" \
  --port "$port" \
  --node-config "data-path='$data' partition-id=$pid output-dir='$out'"
