#!/usr/bin/env bash
# A SuperNode authentication key pair for one site (ECDSA P-384, OpenSSH format, no passphrase).
# The site keeps KEY_DIR/SITE (private) and sends KEY_DIR/SITE.pub to the federation operator,
# who registers it with the SuperLink (`flwr supernode register KEY_DIR/SITE.pub CONNECTION`).
#
# Usage: deploy/make_site_key.sh KEY_DIR SITE
# Needs: ssh-keygen (OpenSSH), or else the Python of the project's venv (cryptography).
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 KEY_DIR SITE" >&2
  exit 2
fi
dir="$1"; site="$2"
mkdir -p "$dir"
key="$dir/$site"
if [[ -e "$key" ]]; then
  echo "error: $key exists; a new key would need a new registration" >&2
  exit 1
fi
if command -v ssh-keygen >/dev/null; then
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$key"
else
  python="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
  "$python" - "$key" "$site" <<'PY'
import os, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

key_path, comment = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                       serialization.PublicFormat.OpenSSH)
fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as fh:
    fh.write(private)
with open(key_path + ".pub", "wb") as fh:
    fh.write(public + b" " + comment.encode() + b"\n")
PY
fi
echo "private key (stays at the site): $key"
echo "public key (register it):        $key.pub"
