#!/usr/bin/env bash
# Set everything up, then show vmmigrate on two hosts on loopback (127.0.0.2 and 127.0.0.3):
# a domain defined on host A, migrated offline p2p with --undefinesource to host B, and back
# client-driven; each host's list shown after each step; then started and migrated live.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
BIN=$PWD/.venv/bin
WORK=$(mktemp -d /tmp/vmmigrate-demo.XXXXXX)
# The daemons' pids go to a file: start() runs in a $(...) subshell, which cannot change
# this shell's variables.
PIDFILE="$WORK/pids"
cleanup() {
  if [ -f "$PIDFILE" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$PIDFILE"
    while read -r pid; do
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    done <"$PIDFILE"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# start DAEMON IP STATEDIR: start a daemon on IP, port 0, and echo the address it bound.
start() {
  local daemon=$1 ip=$2 state=$3 log="$WORK/$1-$2.log"
  "$BIN/$daemon" --listen "$ip:0" --state-dir "$state" --log-format json >"$log" 2>&1 &
  echo $! >>"$PIDFILE"
  for _ in $(seq 200); do
    if grep -q '"daemon_ready"' "$log" 2>/dev/null; then
      "$BIN/python" -c 'import json,sys; print(next(json.loads(l)["listen"] for l in open(sys.argv[1]) if "daemon_ready" in l))' "$log"
      return
    fi
    sleep 0.05
  done
  echo "$daemon on $ip did not start:" >&2; cat "$log" >&2; exit 1
}

A_SRC=$(start srcd 127.0.0.2 "$WORK/hostA"); A_DST=$(start dstd 127.0.0.2 "$WORK/hostA")
B_SRC=$(start srcd 127.0.0.3 "$WORK/hostB"); B_DST=$(start dstd 127.0.0.3 "$WORK/hostB")
echo "host A: srcd $A_SRC, dstd $A_DST   host B: srcd $B_SRC, dstd $B_DST"

run() { echo "\$ $*"; "$@"; }
lists() {
  echo "--- host A:"; "$BIN/migctl" -c "$A_SRC" list --all
  echo "--- host B:"; "$BIN/migctl" -c "$B_SRC" list --all
}

cat >"$WORK/demo-vm.xml" <<'XML'
<domain type='kvm'>
  <name>demo-vm</name>
  <description>a domain that moves between hosts</description>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
XML

run "$BIN/migctl" -c "$A_SRC" define "$WORK/demo-vm.xml"
lists
echo
echo "== offline, peer-to-peer (srcd on A drives it), undefining the source"
run "$BIN/migctl" -c "$A_SRC" migrate --offline --persistent --p2p --undefinesource demo-vm "$B_DST"
lists
echo
echo "== and back, client-driven (migctl drives Begin, Prepare, Finish, Confirm itself)"
run "$BIN/migctl" -c "$B_SRC" migrate --offline --persistent --undefinesource demo-vm "$A_DST"
lists
run "$BIN/migctl" -c "$A_SRC" dominfo demo-vm
echo
echo "== live: start it (simvm, the built-in emulator) and move it while it runs"
run "$BIN/migctl" -c "$A_SRC" start demo-vm
run "$BIN/migctl" -c "$A_SRC" migrate --live --p2p --persistent --undefinesource --verbose demo-vm "$B_DST"
lists
run "$BIN/migctl" -c "$B_SRC" destroy demo-vm
echo "demo finished"
