#!/usr/bin/env bash
# Makes a THROWAWAY test PKI and secrets for trying hubgate locally (deploy/compose.yaml) and
# for deploy/validate.sh. NOTHING made here is for production: Meta only connects to a server
# certificate from a public CA, and only Meta holds the real client certificate.
#
#   deploy/local-pki.sh DIR            # e.g. deploy/local (git-ignored) or a folder in /tmp
#
# DIR gets:
#   tls/ca.pem                 test CA that signed the server certificate (curl --cacert)
#   tls/server-chain.pem       server certificate for localhost / 127.0.0.1 / ::1
#   tls/server.key             its key
#   meta-ca/meta-outbound-api-ca-2025-12.pem
#                              a TEST CA standing in for Meta's CA (subject says TEST)
#   client/meta-client.pem     client certificate CN=client.webhooks.fbclientcerts.com
#   client/meta-client.key     (clientAuth EKU) signed by that test CA, to play Meta with curl
#   client/other-client.pem    a certificate with another CN, which hubgate must refuse
#   client/other-client.key
#   secrets/verify_token       random verify token
#   secrets/app_secret         random app secret
#   secrets/postgres_password  random password of compose-postgres.yaml's database role
#   secrets/spool_url          that database's URL for the gates (postgres://…@postgres:5432/…)
#
# Keys and secrets are mode 0600. Run as root, the files the hubgate container reads
# (tls/server.key, secrets/*) are given to UID/GID 10001, the image's user.
set -euo pipefail

dir=${1:?usage: $0 DIR}
days=${HUBGATE_PKI_DAYS:-30}
command -v openssl >/dev/null || { echo "local-pki.sh: openssl is required" >&2; exit 1; }

if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ "${HUBGATE_PKI_OVERWRITE:-}" != 1 ]; then
  echo "local-pki.sh: $dir is not empty; set HUBGATE_PKI_OVERWRITE=1 to replace its files" >&2
  exit 1
fi

umask 077
mkdir -p "$dir"/{tls,meta-ca,client,secrets}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# ca NAME SUBJECT -> $work/NAME.pem, $work/NAME.key
ca() {
  key "$work/$1.key"
  openssl req -x509 -new -key "$work/$1.key" -sha256 -days "$days" -subj "$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$work/$1.pem" 2>/dev/null
}

# leaf CA_NAME OUT_PEM OUT_KEY SUBJECT EXTENSIONS...
leaf() {
  local ca_name=$1 out=$2 out_key=$3 subj=$4
  shift 4
  key "$out_key"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "authorityKeyIdentifier=keyid" "subjectKeyIdentifier=hash" "$@" >"$work/ext.cnf"
  openssl req -new -key "$out_key" -subj "$subj" -out "$work/req.csr" 2>/dev/null
  openssl x509 -req -in "$work/req.csr" -CA "$work/$ca_name.pem" -CAkey "$work/$ca_name.key" \
    -CAcreateserial -CAserial "$work/$ca_name.srl" -sha256 -days "$days" \
    -extfile "$work/ext.cnf" -out "$out" 2>/dev/null
}

ca server-ca "/O=hubgate TEST/CN=hubgate TEST server CA - NOT FOR PRODUCTION"
leaf server-ca "$dir/tls/server-chain.pem" "$dir/tls/server.key" "/O=hubgate TEST/CN=localhost" \
  "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
cp "$work/server-ca.pem" "$dir/tls/ca.pem"

ca meta-ca "/O=hubgate TEST/CN=TEST stand-in for Meta outbound API CA - NOT META"
cp "$work/meta-ca.pem" "$dir/meta-ca/meta-outbound-api-ca-2025-12.pem"
leaf meta-ca "$dir/client/meta-client.pem" "$dir/client/meta-client.key" \
  "/CN=client.webhooks.fbclientcerts.com" "extendedKeyUsage=clientAuth"
leaf meta-ca "$dir/client/other-client.pem" "$dir/client/other-client.key" \
  "/CN=someone-else.example" "extendedKeyUsage=clientAuth"

openssl rand -hex 16 >"$dir/secrets/verify_token"
openssl rand -hex 32 >"$dir/secrets/app_secret"
# compose-postgres.yaml: the database's password and the gates' URL holding it (hex: nothing to
# percent-encode). sslmode=disable: the database is on the compose project's internal network.
pg_password=$(openssl rand -hex 24)
printf '%s\n' "$pg_password" >"$dir/secrets/postgres_password"
printf 'postgres://hubgate:%s@postgres:5432/hubgate?sslmode=disable\n' "$pg_password" >"$dir/secrets/spool_url"

chmod 0644 "$dir"/tls/*.pem "$dir"/meta-ca/*.pem "$dir"/client/*.pem
chmod 0755 "$dir" "$dir"/{tls,meta-ca,client,secrets}
chmod 0600 "$dir"/tls/server.key "$dir"/client/*.key "$dir"/secrets/*
if [ "$(id -u)" = 0 ]; then
  chown 10001:10001 "$dir/tls/server.key" "$dir"/secrets/*
else
  echo "local-pki.sh: for docker compose, make the key and secrets readable by UID 10001:" >&2
  echo "  sudo chown 10001:10001 $dir/tls/server.key $dir/secrets/*" >&2
fi
echo "local-pki.sh: test PKI (valid $days days, NOT FOR PRODUCTION) in $dir"
