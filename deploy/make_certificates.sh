#!/usr/bin/env bash
# Certificates for the SuperLink: a private certificate authority (CA) and a server
# certificate signed by it. The SuperLink gets ca.crt + server.pem + server.key; every site
# (SuperNode) and every operator running `flwr` gets ca.crt only.
#
# Usage: deploy/make_certificates.sh OUT_DIR [HOST_OR_IP ...]
#   HOST_OR_IP: names under which the sites reach the SuperLink (added to the certificate's
#   subjectAltName next to localhost and 127.0.0.1), e.g. superlink.hospital-net.org 10.0.0.5
# Needs: openssl. Refuses to overwrite an existing ca.key (a new CA would lock every site out).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [HOST_OR_IP ...]" >&2
  exit 2
fi
out="$1"; shift
mkdir -p "$out"
if [[ -e "$out/ca.key" ]]; then
  echo "error: $out/ca.key exists; remove the folder first to make a new CA" >&2
  exit 1
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done

umask 077  # private keys readable by their owner only
# 1. the certificate authority (10 years)
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days 3650 \
  -subj "/CN=FedBiCross federation CA" -out "$out/ca.crt"
# 2. the SuperLink's key and certificate (1 year), signed by the CA
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=fedbicross-superlink" -out "$out/server.csr"
cat > "$out/server.ext" <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
EXT
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -days 365 -sha256 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "CA certificate:     $out/ca.crt   (give to every site and operator)"
echo "SuperLink cert/key: $out/server.pem $out/server.key   (SuperLink only; keep ca.key offline)"
echo "subjectAltName:     $san"
