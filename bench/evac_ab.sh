#!/bin/bash
# Evacuation A/B, interleaved: BASE's migctl evacuate against NEW's, and on NEW's daemons the
# old unary path against MigrateMany (bench_evac_many), ROUNDS times.
#   bench/evac_ab.sh BASE_WORKTREE NEW_WORKTREE [ROUNDS] [IPS]
set -u
base=$1; new=$2; rounds=${3:-3}; ips=${4:-127.0.0.12,127.0.0.13}
for round in $(seq "$rounds"); do
  echo "== round $round: base migctl evacuate"
  (cd "$base" && .venv/bin/python -m bench.bench_evacuate --domains 1000 --parallel-levels 16 --ips "$ips" 2>&1 | grep -E "^ +16 ")
  echo "== round $round: new migctl evacuate"
  (cd "$new" && .venv/bin/python -m bench.bench_evacuate --domains 1000 --parallel-levels 16 --ips "$ips" 2>&1 | grep -E "^ +16 ")
  echo "== round $round: new, unary vs many (same daemons)"
  (cd "$new" && .venv/bin/python -m bench.bench_evac_many --domains 1000 --rounds 1 --ips "$ips" 2>&1 | grep -E "unary|many")
  uptime
done
