"""Interleaved before/after of the offline latency: bench_offline run alternately in two (or
more) worktrees, ABBA order, and the medians of each run's p50s and daemon CPU per
migration, with the ratios to the first tree.

    python bench/ab_offline.py ROUNDS BASE_WORKTREE NEW_WORKTREE
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

MODES = ("p2p", "managed", "managed_migctl")


def main() -> None:
    rounds = int(sys.argv[1])
    trees = sys.argv[2:]
    keys = [*MODES, "cpu_p2p", "cpu_managed"]
    res: dict[str, dict[str, list[float]]] = {t: {k: [] for k in keys} for t in trees}
    for r in range(rounds):
        for t in trees if r % 2 == 0 else trees[::-1]:
            out = f"/tmp/ab_{t.replace('/', '_')}_{r}.json"
            cmd = [f"{t}/.venv/bin/python", "-m", "bench.bench_offline", "--n", "100",
                   "--warmup", "20", "--domains", "10", "--clients", "1", "--idle-s", "0.2",
                   "--json", out]  # fmt: skip
            subprocess.run(cmd, cwd=t, stdout=subprocess.DEVNULL, check=True)
            with open(out) as f:
                d = json.load(f)["latency"]
            for m in MODES:
                res[t][m].append(d[m]["p50"])
            res[t]["cpu_p2p"].append(sum(d["p2p"]["cpu_ms_per_migration"].values()))
            res[t]["cpu_managed"].append(sum(d["managed"]["cpu_ms_per_migration"].values()))
            print(t, r, {m: d[m]["p50"] for m in MODES}, flush=True)
    med = {t: {k: statistics.median(v) for k, v in res[t].items()} for t in trees}
    for t in trees:
        print(t, {k: round(v, 2) for k, v in med[t].items()})
    for t in trees[1:]:
        print("ratio", t, "/", trees[0], {k: round(med[t][k] / med[trees[0]][k], 3) for k in keys})


if __name__ == "__main__":
    main()
