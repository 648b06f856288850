#!/usr/bin/env bash
# Generates the benchmark's Meta-shaped test PKI in DIR (default: bench/work/pki), RSA 2048:
#   root CA -> intermediate CA -> client leaf CN=client.webhooks.fbclientcerts.com (clientAuth)
#   root CA -> intermediate CA -> client leaf with a wrong CN (clientAuth)
#   rogue root -> client leaf with the right CN (not chained to the trusted root)
#   root CA -> server leaf for IP 127.0.0.1 (serverAuth)
# Files: root.pem, client-chain.pem (leaf + intermediate), client.key, wrongcn-chain.pem,
# wrongcn.key, rogue-chain.pem, rogue.key, server.pem, server.key, server-full.pem (cert+key).
set -euo pipefail
dir=${1:-"$(dirname "$0")/work/pki"}
mkdir -p "$dir"
cd "$dir"

key() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }

ext() { # name, body -> writes an extension file
  printf '%s\n' "$2" >"$1.ext"
}

# sign NAME ISSUER SUBJECT EXTFILE DAYS
sign() {
  local name=$1 issuer=$2 subj=$3 extf=$4
  key "$name.key"
  openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA "$issuer.pem" -CAkey "$issuer.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$extf" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr"
}

selfsigned() { # NAME SUBJECT
  key "$1.key"
  openssl req -x509 -new -key "$1.key" -subj "$2" -days 30 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$1.pem" 2>/dev/null
}

ext ca 'basicConstraints=critical,CA:TRUE,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid'
ext client 'basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid'
ext server 'basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid'

selfsigned root "/C=US/O=hubgate bench/CN=hubgate bench root CA"
sign intermediate root "/C=US/O=hubgate bench/CN=hubgate bench client CA" ca.ext
sign client intermediate "/C=US/ST=California/L=Menlo Park/O=Meta Platforms, Inc./CN=client.webhooks.fbclientcerts.com" client.ext
sign wrongcn intermediate "/C=US/O=Not Meta/CN=client.webhooks.example.com" client.ext
sign server root "/C=US/O=hubgate bench/CN=127.0.0.1" server.ext
selfsigned rogueroot "/C=US/O=Rogue/CN=rogue root CA"
sign rogue rogueroot "/C=US/O=Meta Platforms, Inc./CN=client.webhooks.fbclientcerts.com" client.ext

cat client.pem intermediate.pem >client-chain.pem
cat wrongcn.pem intermediate.pem >wrongcn-chain.pem
cp rogue.pem rogue-chain.pem
cat server.pem server.key >server-full.pem
openssl verify -CAfile root.pem -untrusted intermediate.pem -purpose sslclient client.pem >/dev/null
openssl verify -CAfile root.pem -purpose sslserver server.pem >/dev/null
rm -f ./*.ext ./*.srl
