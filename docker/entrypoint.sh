#!/bin/bash
# One vmmigrate host per container: srcd and dstd share the state directory (the host's
# store and job journal), so they must live together. If either daemon exits the container
# exits with it, so that Docker's restart policy and health checks see one host, not half of
# one. "pki" makes the cluster's TLS material (the compose file's init service); any other
# command runs as it is, for the migctl client service.
set -euo pipefail

case "${1:-host}" in
    host) shift || true ;;
    pki) exec /opt/vmmigrate/libexec/pki-init.sh ;;
    *) exec "$@" ;;
esac

state=${VMMIGRATE_STATE_DIR:-/var/lib/vmmigrate}
mkdir -p "$state"
# Listening on every address of the container: dstd then names this container's hostname
# as where incoming emulators listen, which the compose network resolves for the peer.
# Mutual TLS with this host's certificate (made by the pki service, mounted read-only):
# without it a daemon refuses to listen off loopback, so a missing volume stops the host
# with the daemon's own message instead of serving plaintext.
tls=${VMMIGRATE_TLS_DIR:-/etc/vmmigrate/pki}
dstd --listen "0.0.0.0:${DSTD_PORT:-7302}" --state-dir "$state" --tls-dir "$tls" "$@" &
dstd_pid=$!
srcd --listen "0.0.0.0:${SRCD_PORT:-7301}" --state-dir "$state" --tls-dir "$tls" "$@" &
srcd_pid=$!

stop() {
    kill -TERM "$srcd_pid" "$dstd_pid" 2>/dev/null || true
}
trap stop TERM INT

# wait -n returns when the first daemon exits (or a trapped signal arrives)
status=0
wait -n "$srcd_pid" "$dstd_pid" || status=$?
stop
wait "$srcd_pid" "$dstd_pid" 2>/dev/null || true
exit "$status"
