#!/usr/bin/env python3
"""QEMU's switch-over against its downtime limit, with no daemons: bare QEMUs (bench_live's
guest: 512 MiB, 400 MiB random RAM) migrated ping-pong as ``raw_chain`` (each hop's source is
the previous hop's resumed destination), the limit alternated hop by hop, so that background
load falls on every limit alike. Per hop: QEMU's total-time and downtime, the destination's
lag (its MIGRATION completed after the source's) and the guest's pause (STOP on the source
to RESUME on the destination, which is resumed as soon as it has the whole stream).

    .venv/bin/python -m bench.bench_switchover [--hops 6] [--limits 20,300]

A benchmark script, not a test; every QEMU it starts is killed (by pid) before it exits.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_live import IP_B, QMP, event_unix, free_port, is_migration, make_fill, raw_argv


def start(
    work: Path, tag: str, mem: int, fill: Path, extra: list[str]
) -> tuple[subprocess.Popen[bytes], QMP]:
    qmp = work / f"{tag}.qmp"
    proc = subprocess.Popen(
        [*raw_argv(mem, fill, qmp), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, QMP(str(qmp))


def hop(src: QMP, dst: QMP, port: int, limit: int) -> dict[str, Any]:
    caps = [{"capability": "events", "state": True}]
    src.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-set-capabilities", capabilities=caps)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30, "downtime-limit": limit})
    time.sleep(0.5)
    src.events.clear()
    src.cmd("migrate", uri=f"tcp:{IP_B}:{port}")
    done_src = src.wait_event(is_migration("completed"))
    done_dst = dst.wait_event(is_migration("completed"))
    dst.cmd("cont")
    info = src.cmd("query-migrate")
    for _ in range(1000):  # QEMU fills in its totals a moment after the event
        if info.get("total-time"):
            break
        time.sleep(0.001)
        info = src.cmd("query-migrate")
    stop = src.wait_event(lambda e: e.get("event") == "STOP")
    resume = dst.wait_event(lambda e: e.get("event") == "RESUME")
    return {
        "limit_ms": limit,
        "total_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "dst_lag_ms": round((event_unix(done_dst) - event_unix(done_src)) * 1e3, 1),
        "pause_ms": round((event_unix(resume) - event_unix(stop)) * 1e3, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hops", type=int, default=6, help="migrations (limits alternate)")
    ap.add_argument("--limits", default="20,300", help="downtime limits to alternate, ms")
    ap.add_argument("--mem", type=int, default=512, help="guest RAM, MiB")
    ap.add_argument("--fill-mib", type=int, default=400, help="random data loaded into RAM")
    args = ap.parse_args()
    limits = [int(x) for x in args.limits.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-switchover-"))
    fill = work / "fill.bin"
    make_fill(fill, args.fill_mib)
    rows: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc, src = start(work, "q0", args.mem, fill, [])
        procs.append(proc)
        time.sleep(1.0)
        for i in range(args.hops):
            port = free_port(IP_B)
            incoming = ["-S", "-incoming", f"tcp:{IP_B}:{port}"]
            proc, dst = start(work, f"q{i + 1}", args.mem, fill, incoming)
            procs.append(proc)
            row = hop(src, dst, port, limits[i % len(limits)])
            print(row, flush=True)
            rows.append(row)
            src.close()
            old = procs.pop(0)
            old.kill()
            old.wait()
            src = dst
        src.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    for limit in limits:
        mine = [r for r in rows if r["limit_ms"] == limit]
        if mine:
            med = {
                k: statistics.median(float(r[k] or 0) for r in mine)
                for k in mine[0]
                if k != "limit_ms"
            }
            print(f"limit {limit} ms, {len(mine)} hops, medians: {med}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
