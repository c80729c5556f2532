#!/bin/bash
# One vmmigrate host per container: srcd and dstd share the state directory (the host's
# store and job journal), so they must live together. If either daemon exits the container
# exits with it, so that Docker's restart policy and health checks see one host, not half of
# one. "client" (or any other command) runs that command instead, for the migctl service.
set -euo pipefail

if [ "${1:-host}" != "host" ]; then
    exec "$@"
fi
shift || true

state=${VMMIGRATE_STATE_DIR:-/var/lib/vmmigrate}
mkdir -p "$state"
# Listening on every address of the container: dstd then names this container's hostname
# as where incoming emulators listen, which the compose network resolves for the peer.
# Plaintext off loopback needs --insecure (until the cluster gets its TLS material).
dstd --listen "0.0.0.0:${DSTD_PORT:-7302}" --state-dir "$state" --insecure "$@" &
dstd_pid=$!
srcd --listen "0.0.0.0:${SRCD_PORT:-7301}" --state-dir "$state" --insecure "$@" &
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
