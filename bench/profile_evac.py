#!/usr/bin/env python3
"""The evacuation phase under py-spy: --domains inactive domains defined on A, migrated
A -> B by --clients concurrent clients (bench_offline's evac), with py-spy recording the
four daemons; writes one folded-stack file per daemon into DIR and prints the rate.

    .venv/bin/python -m bench.profile_evac DIR [--domains 1000] [--clients 16] [--many]

--many: one MigrateMany call instead (what migctl evacuate sends), --clients its --parallel.

A profiling aid, not a clean benchmark (py-spy slows the daemons it samples).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from bench.bench_offline import (
    Client,
    add_host_options,
    bench_root,
    daemon_pids,
    define_all,
    evacuate,
    evacuate_many,
    find_py_spy,
    two_hosts,
)
from tests.helpers.hosts import Host


async def run(args: argparse.Namespace, out: Path, a: Host, b: Host) -> int:
    exe = find_py_spy()
    if exe is None:
        print("py-spy not found", file=sys.stderr)
        return 1
    pids = daemon_pids(a, b)
    client = Client(a, b, None)
    await client.ready()
    try:
        names = [f"evac-{i:04d}" for i in range(args.domains)]
        await define_all(client, names)
        spies = {}
        for key, pid in pids.items():
            cmd = [exe, "record", "--pid", str(pid), "--rate", str(args.rate), "--format",
                   "raw", "--output", str(out / f"{key}.folded"), "--nonblocking", "--gil"]  # fmt: skip
            spies[key] = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
            )
        await asyncio.sleep(2.0)
        if args.many:
            r = await evacuate_many(client.hosts, names, "A", "B", args.clients)
        else:
            r = await evacuate(client.hosts, names, "A", "B", args.clients)
        for p in spies.values():
            p.send_signal(signal.SIGINT)
        for p in spies.values():
            p.wait(timeout=30)
        print(f"{r['migr_per_s']} migrations/s under py-spy ({r['ok']} ok, {r['errors']} errors)")
        return 0 if not r["errors"] else 1
    finally:
        await client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory for the folded stacks")
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--many", action="store_true",
                    help="one MigrateMany call (migctl evacuate's path), --clients its parallel")
    add_host_options(ap)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        root = bench_root(stack, args.workdir, "vmm-prof-")
        a, b = stack.enter_context(two_hosts(root, args.ips))
        return asyncio.run(run(args, out, a, b))


if __name__ == "__main__":
    sys.exit(main())
