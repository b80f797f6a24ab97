#!/usr/bin/env bash
# Make a private CA and the two certificates of the worker ↔ listener mutual TLS:
#   ca.crt                     the CA both sides trust (ca.key stays with you, outside the cluster)
#   worker.crt / worker.key    server certificate of the workers (also usable as a client, for probes)
#   listener.crt / listener.key client certificate of the listener
# Usage: deploy/k8s/make-certs.sh OUT_DIR [NAMESPACE] [DAYS]
#   e.g. deploy/k8s/make-certs.sh deploy/k8s/overlays/multi-gpu/tls medgemma 365
# For production, prefer certificates from the hospital PKI or cert-manager with the same names
# (SANs below) and file names.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
  echo "usage: $0 OUT_DIR [NAMESPACE] [DAYS]" >&2
  exit 2
fi
out="$1"
namespace="${2:-medgemma}"
days="${3:-365}"
command -v openssl >/dev/null 2>&1 || { echo "$0: openssl is required" >&2; exit 2; }
mkdir -p "$out"
umask 077

openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$days" \
  -subj "/CN=medgemma-deploy CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null

issue() {  # name common_name extended_key_usage subject_alt_names
  local name="$1" cn="$2" eku="$3" san="$4"
  openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=$cn" \
    -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$eku" "$san" > "$out/$name.ext"
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$out/$name.ext" -out "$out/$name.crt" 2>/dev/null
  rm -f "$out/$name.csr" "$out/$name.ext"
}

svc="medgemma-worker"
issue worker "$svc" "serverAuth,clientAuth" \
  "DNS:$svc,DNS:$svc.$namespace,DNS:$svc.$namespace.svc,DNS:$svc.$namespace.svc.cluster.local,DNS:*.$svc.$namespace.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
issue listener "medgemma-listener" "clientAuth" "DNS:medgemma-listener,DNS:medgemma-listener.$namespace.svc"
rm -f "$out/ca.srl"
chmod 0644 "$out"/*.crt
echo "wrote $out/{ca,worker,listener}.crt and keys; keep $out/ca.key out of the cluster"
