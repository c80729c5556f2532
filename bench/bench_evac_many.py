#!/usr/bin/env python3
"""Evacuation A/B, interleaved in one run on the same daemons: the old path (one unary
Migrate RPC per domain from --clients concurrent clients, bench_offline's evac) against the
new one (one MigrateMany call, --parallel, what ``migctl evacuate`` sends), alternately,
A -> B then B -> A, --rounds times each. --domains inactive domains (default 1,000). Reports
each run's rate and each daemon's CPU (user + system) per migration, and the medians.

    .venv/bin/python -m bench.bench_evac_many [--domains 1000] [--rounds 3] [--json PATH]

Two real hosts (srcd + dstd each, separate processes), as bench_offline starts them. Every
run must move every domain and leave each on exactly the expected host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
from typing import Any

from bench.bench_offline import (
    Client,
    CpuMeter,
    add_host_options,
    bench_root,
    daemon_pids,
    define_all,
    evacuate,
    evacuate_many,
    two_hosts,
    verify_placement,
)
from tests.helpers.hosts import Host


def _split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


async def one(client: Client, pids: dict[str, int], names: list[str], path: str,
              frm: str, to: str, width: int) -> dict[str, Any]:
    split0 = {k: _split(p) for k, p in pids.items()}
    with CpuMeter(pids) as cpu:
        if path == "many":
            r = await evacuate_many(client.hosts, names, frm, to, width)
        else:
            r = await evacuate(client.hosts, names, frm, to, width)
    r["path"] = path
    n = max(r["ok"], 1)
    r["user_sys_ms_per_migr"] = {
        k: (round((u - split0[k][0]) * 1000 / n, 3), round((st - split0[k][1]) * 1000 / n, 3))
        for k, (u, st) in ((k, _split(p)) for k, p in pids.items())
        if (u - split0[k][0]) + (st - split0[k][1]) > 0.05
    }
    r["cpu_ms_per_migr"] = cpu.per_migration_ms(max(r["ok"], 1))
    r["daemons_cpu_ms_per_migr"] = round(
        sum(v for k, v in r["cpu_ms_per_migr"].items() if k != "client"), 3
    )
    r["placement_ok"] = (await verify_placement(client, names, to))["ok"]
    return r


async def run(args: argparse.Namespace, a: Host, b: Host) -> int:
    client = Client(a, b, None)
    await client.ready()
    pids = daemon_pids(a, b)
    results: list[dict[str, Any]] = []
    try:
        names = [f"evac-{i:04d}" for i in range(args.domains)]
        await define_all(client, names)
        here = "A"
        for _ in range(args.rounds):
            for path, width in (("unary", args.clients), ("many", args.parallel)):
                there = "B" if here == "A" else "A"
                r = await one(client, pids, names, path, here, there, width)
                results.append(r)
                print(f"  {path:5} {here}->{there}: {r['migr_per_s']:7.1f} migrations/s, "
                      f"daemons {r['daemons_cpu_ms_per_migr']:.3f} ms CPU/migr "
                      f"(user, sys) {r['user_sys_ms_per_migr']} ok={r['ok']} errors={r['errors']} "
                      f"placement={r['placement_ok']}", flush=True)
                here = there
    finally:
        await client.close()
    summary = {}
    for path in ("unary", "many"):
        rows = [r for r in results if r["path"] == path]
        summary[path] = {
            "median_per_s": statistics.median(r["migr_per_s"] for r in rows),
            "median_daemons_cpu_ms": statistics.median(r["daemons_cpu_ms_per_migr"] for r in rows),
        }
    ratio = summary["many"]["median_per_s"] / summary["unary"]["median_per_s"]
    print(f"median: unary ({args.clients} clients) {summary['unary']['median_per_s']}/s, "
          f"MigrateMany (parallel {args.parallel}) {summary['many']['median_per_s']}/s: "
          f"{ratio:.2f}x; daemons CPU/migr {summary['unary']['median_daemons_cpu_ms']} -> "
          f"{summary['many']['median_daemons_cpu_ms']} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": results, "summary": summary, "ratio": ratio}, fh, indent=1)
    bad = [r for r in results if r["errors"] or not r["placement_ok"]]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16, help="the old path's clients")
    ap.add_argument("--parallel", type=int, default=16, help="MigrateMany's parallel")
    add_host_options(ap)
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        root = bench_root(stack, args.workdir, "vmm-evac-ab-")
        a, b = stack.enter_context(two_hosts(root, args.ips))
        return asyncio.run(run(args, a, b))


if __name__ == "__main__":
    sys.exit(main())
