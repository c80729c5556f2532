#!/usr/bin/env python3
"""Evacuation through the command an operator runs: ``migctl evacuate --offline``.

bench_offline's "evac" phase drives Migrate RPCs from warm in-process clients; this one
times the real command (a migctl process: its start-up, its List, a GetInfo per domain
before its Migrate and one after, its output) for --domains inactive domains (default 300)
at each --parallel level in --parallel-levels (default 1,4,16), A -> B and then B -> A.
After each run migctl's exit status and summary must say every domain moved, and both
hosts are listed: every domain must be on exactly the expected host.

    .venv/bin/python -m bench.bench_evacuate [--domains 300] [--json /tmp/evac.json]

Two real hosts (srcd + dstd each, separate processes) on 127.0.0.2 and 127.0.0.3 in a
temporary directory, as bench_offline starts them. A benchmark, not a test: bounded, stops
by itself, exit status 1 if any run did not move everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import subprocess
import sys
import time
from typing import Any

from bench.bench_offline import (
    Client,
    CpuMeter,
    add_host_options,
    bench_root,
    daemon_pids,
    define_all,
    end_results,
    machine_line,
    new_results,
    runtime_line,
    two_hosts,
    verify_placement,
)
from tests.helpers.hosts import Host

MIGCTL_TIMEOUT = 1800.0


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_migctl(src: Host, dst: Host, parallel: int, n: int) -> dict[str, Any]:
    """One ``migctl evacuate --offline`` from ``src`` to ``dst``, timed from the process's
    start to its exit."""
    cmd = [
        sys.executable, "-m", "vmmigrate.migctl", "-c", src.src,
        "evacuate", "--offline", "--parallel", str(parallel), dst.dst,
    ]  # fmt: skip
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=MIGCTL_TIMEOUT, stdin=subprocess.DEVNULL,
        check=False,
    )
    wall = time.perf_counter() - t0
    cpu = children_cpu_s() - cpu0
    expect = f"Evacuation to {dst.dst}: {n} moved, 0 not moved"
    ok = r.returncode == 0 and expect in r.stdout.splitlines()
    return {
        "direction": f"{src.name}->{dst.name}",
        "parallel": parallel,
        "exit_status": r.returncode,
        "summary_ok": ok,
        "wall_s": round(wall, 3),
        "migr_per_s": round(n / wall, 1),
        "migctl_cpu_ms_per_migration": round(cpu * 1000 / max(n, 1), 3),
        "stderr_tail": r.stderr[-500:],
    }


def startup_ms(src: Host) -> float:
    """migctl's own start-up and one List call (``list --all --name``), for reference."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "vmmigrate.migctl", "-c", src.src, "list", "--all", "--name"],
        capture_output=True, check=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return round((time.perf_counter() - t0) * 1000, 1)


async def bench(args: argparse.Namespace, a: Host, b: Host) -> dict[str, Any]:
    pids = daemon_pids(a, b)
    names = [f"evac-{i:04d}" for i in range(args.domains)]
    client = Client(a, b)  # for defining and checking placement only; migctl migrates
    try:
        await client.ready()
        define_s = await define_all(client, names)
        runs = []
        ms = await asyncio.to_thread(startup_ms, a)
        for parallel in [int(x) for x in args.parallel_levels.split(",")]:
            for src, dst in ((a, b), (b, a)):
                with CpuMeter(pids) as cpu:
                    r = await asyncio.to_thread(run_migctl, src, dst, parallel, len(names))
                r["daemon_cpu_ms_per_migration"] = {
                    k: v for k, v in cpu.per_migration_ms(len(names)).items() if k != "client"
                }
                r["verify"] = await verify_placement(client, names, dst.name)
                runs.append(r)
                print(
                    f"  --parallel {parallel:2d} {r['direction']}: {r['migr_per_s']:7.1f} "
                    f"migrations/s ({r['wall_s']:.2f} s, exit {r['exit_status']}, "
                    f"placement ok={r['verify']['ok']})",
                    flush=True,
                )
    finally:
        await client.close()
    return {"define_all_s": round(define_s, 3), "migctl_list_startup_ms": ms, "runs": runs}


def table(results: dict[str, Any]) -> str:
    lines = [
        "",
        "vmmigrate evacuation benchmark: migctl evacuate --offline",
        machine_line(results["machine"]),
        f"{results['params']['domains']} inactive domains; migctl start-up + one List: "
        f"{results['migctl_list_startup_ms']} ms",
        f"{'parallel':>8s} {'dir':>5s} {'migr/s':>8s} {'wall s':>8s} {'exit':>5s} "
        f"{'migctl cpu ms/migr':>19s} {'daemons cpu ms/migr':>20s}  placement",
    ]
    for r in results["runs"]:
        daemons = sum(r["daemon_cpu_ms_per_migration"].values())
        lines.append(
            f"{r['parallel']:8d} {r['direction']:>5s} {r['migr_per_s']:8.1f} {r['wall_s']:8.2f} "
            f"{r['exit_status']:5d} {r['migctl_cpu_ms_per_migration']:19.3f} {daemons:20.3f}  "
            f"{'ok' if r['verify']['ok'] and r['summary_ok'] else 'FAILED'}"
        )
    lines.append(runtime_line(results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=300, help="inactive domains to evacuate")
    ap.add_argument("--parallel-levels", default="1,4,16", help="--parallel values, comma-separated")
    add_host_options(ap)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    results = new_results({"domains": args.domains, "parallel_levels": args.parallel_levels})
    with contextlib.ExitStack() as stack:
        root = bench_root(stack, args.workdir, "vmm-evac-")
        a, b = stack.enter_context(two_hosts(root, args.ips))
        results.update(asyncio.run(bench(args, a, b)))
    end_results(results, started, table, args.json)
    ok = all(r["verify"]["ok"] and r["summary_ok"] for r in results["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
