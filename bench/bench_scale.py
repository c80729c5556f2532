#!/usr/bin/env python3
"""Scale benchmark: offline p2p latency with 10 and with N domains on the source host, the
daemons' CPU per migration at each size, ``migctl list --all`` and a daemon restart with N.

The measurement of bench/run's ``scale`` step (bench/figures.py), on its own and with the
CPU figures, so that two trees can be compared run by run:

    .venv/bin/python -m bench.bench_scale --domains 10000 --n 100

Two fresh hosts (bench_offline.two_hosts, 127.0.0.2 and .3); 10 domains are defined on A
(through srcd, 8 Define calls at a time) and one more domain is migrated A -> B -> A ...
(10 untimed, then --n timed, one Migrate RPC each); then the other N - 10 are defined and
another domain is migrated the same way. Then ``migctl list --all`` against A's srcd
(--list-reps times, each a new process, its output checked to hold every domain) and a
restart of A's srcd and dstd (spawn -> ``daemon_ready``, the slower of the two).
This is a benchmark script, not a test: the loops are bounded and it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from typing import Any

from bench import bench_offline as bo
from bench.figures import restart_ms
from tests.helpers.hosts import Host, sample_domain_xml

SMALL = 10


async def p2p_at(
    a: Host, b: Host, names: list[str], n: int, warmup: int, probe: str
) -> dict[str, Any]:
    """Define ``names`` on A, then time ``n`` p2p migrations of ``probe`` back and forth."""
    client = bo.Client(a, b)
    try:
        await client.ready()
        define_s = await bo.define_all(client, names)
        await client.define("A", sample_domain_xml(probe))
        step = bo.p2p_step(client, probe)
        await bo.ping_pong(client, probe, step, warmup, 0)
        with bo.CpuMeter(bo.daemon_pids(a, b)) as cpu:
            times = await bo.ping_pong(client, probe, step, 0, n)
    finally:
        await client.close()
    return {
        "define_s": round(define_s, 2),
        "latency_ms": bo.summarize(times),
        "cpu_ms_per_migration": cpu.per_migration_ms(len(times)),
    }


def list_all_ms(a: Host, expect: int, reps: int) -> list[float]:
    walls = []
    for _ in range(reps):
        argv = [sys.executable, "-m", "vmmigrate.migctl", "-c", a.src, "list", "--all"]
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout
        walls.append(round((time.perf_counter() - t0) * 1e3, 1))
        assert out.count("\n") >= expect, out[-500:]
    return walls


def table(r: dict[str, Any]) -> str:
    small, large = r["small"], r["large"]
    p10, pn = small["latency_ms"]["p50"], large["latency_ms"]["p50"]
    return "\n".join(
        [
            "",
            "vmmigrate scale benchmark",
            bo.machine_line(r["machine"]),
            f"p2p p50 with {SMALL} domains {p10:.2f} ms, with {r['params']['domains']} "
            f"{pn:.2f} ms: ratio {pn / p10:.2f} (target <= 1.2)",
            f"CPU per migration (ms) with {SMALL}: {json.dumps(small['cpu_ms_per_migration'])}",
            f"CPU per migration (ms) with {r['params']['domains']}: "
            f"{json.dumps(large['cpu_ms_per_migration'])}",
            f"defining {r['params']['domains'] - SMALL} domains: {large['define_s']} s",
            f"migctl list --all (ms): {r['list_all_ms']}",
            f"daemon restart with {r['params']['domains']} domains: {r['restart_ms']} ms",
            bo.runtime_line(r),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=10_000, help="the large domain count")
    ap.add_argument("--n", type=int, default=100, help="timed migrations at each size")
    ap.add_argument("--warmup", type=int, default=10, help="untimed migrations first")
    ap.add_argument("--list-reps", type=int, default=3, help="migctl list --all runs")
    bo.add_host_options(ap)
    args = ap.parse_args(argv)
    if args.domains <= SMALL:
        ap.error(f"--domains must be more than {SMALL}")
    started = time.perf_counter()
    results = bo.new_results({"domains": args.domains, "n": args.n, "warmup": args.warmup})
    names = [f"scale-{i:05d}" for i in range(args.domains)]
    with contextlib.ExitStack() as stack:
        root = bo.bench_root(stack, args.workdir, "vmm-scale-")
        a, b = stack.enter_context(bo.two_hosts(root, args.ips))
        results["small"] = asyncio.run(p2p_at(a, b, names[:SMALL], args.n, args.warmup, "p-s"))
        results["large"] = asyncio.run(p2p_at(a, b, names[SMALL:], args.n, args.warmup, "p-l"))
        results["list_all_ms"] = list_all_ms(a, args.domains, args.list_reps)
        results["restart_ms"] = round(restart_ms(a), 1)
    bo.end_results(results, started, table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
