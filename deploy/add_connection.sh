#!/usr/bin/env bash
# Tell the operator's `flwr` CLI how to reach the SuperLink: a [superlink.NAME] section in
# $FLWR_HOME/config.toml (default ~/.flwr/config.toml). Used by `flwr supernode register`,
# `flwr run . NAME`, `flwr list NAME`, `flwr log RUN_ID NAME`.
#
# Usage: deploy/add_connection.sh NAME ADDRESS CA_CERT
#   ADDRESS: host:port of the SuperLink; CA_CERT: the federation's ca.crt
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 NAME ADDRESS CA_CERT" >&2
  exit 2
fi
name="$1"; address="$2"; ca="$(cd "$(dirname "$3")" && pwd)/$(basename "$3")"
home="${FLWR_HOME:-$HOME/.flwr}"
mkdir -p "$home"
config="$home/config.toml"
if [[ -f "$config" ]] && grep -q "^\[superlink\.$name\]" "$config"; then
  echo "error: $config already has [superlink.$name]; edit or remove it first" >&2
  exit 1
fi
cat >> "$config" <<TOML

[superlink.$name]
address = "$address"
root-certificates = "$ca"
TOML
echo "connection '$name' -> $address (CA $ca) written to $config"
