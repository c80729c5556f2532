#!/bin/bash
# The compose cluster's TLS material, made with `migctl pki` by the one-shot "pki" service
# before any host starts. Each identity has a volume of its own, mounted at /pki/NAME here
# and read-only by the one container that uses it, so a host sees its own key and never the
# CA's (which stays in the pki-ca volume, mounted by this service only).
#
#   PKI_HOSTS="hosta hostb"                      host certificates, the name as DNS SAN
#   PKI_CLIENTS="admin:admin readonly:readonly"  client certificates, NAME:ROLE
#
# Idempotent: an existing CA is kept, and an identity whose files exist and were signed by
# that CA is left alone, so `docker-compose up` after the first one changes nothing. A new
# CA (its volume was removed) re-issues every identity, since the old ones no longer verify.
set -euo pipefail

root=${PKI_ROOT:-/pki}
ca=$root/ca

if [ ! -s "$ca/ca.pem" ] || [ ! -s "$ca/ca-key.pem" ]; then
    # --force: a half-made CA (one of the two files) from an interrupted run is replaced
    migctl pki init "$ca" --name "${PKI_CA_NAME:-vmmigrate compose CA}" --force
fi

current() {
    [ -s "$1/cert.pem" ] && [ -s "$1/key.pem" ] && cmp -s "$ca/ca.pem" "$1/ca.pem"
}

for host in ${PKI_HOSTS:-hosta hostb}; do
    if current "$root/$host"; then
        echo "host certificate '$host' present in $root/$host"
    else
        migctl pki issue "$ca" --host "$host" --out "$root/$host"
    fi
done

for entry in ${PKI_CLIENTS:-admin:admin readonly:readonly}; do
    name=${entry%%:*}
    role=${entry#*:}
    if current "$root/$name"; then
        echo "client certificate '$name' present in $root/$name"
    else
        migctl pki issue "$ca" --client "$name" --role "$role" --out "$root/$name"
    fi
done
