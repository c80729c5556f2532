#!/usr/bin/env python3
"""What mutual TLS costs, plaintext against mTLS in the same run, with real daemons.

  start     time from spawning a daemon to its ``daemon_ready`` log line (read from the
            daemon's own output as it is written, no polling), median of --starts, for
            each of srcd and dstd, plaintext and with --tls-dir (certificates read and
            checked, TLS credentials built); one untimed start of each first (state
            directory created, files in the page cache), then plain and tls alternately
  offline   p2p offline migration latency (DomainService.Migrate, flags 0x41a) over warm
            in-process channels, bench_offline's loop: --warmup untimed, then --n timed
            per mode, in rounds of 10 alternating plain and tls; the p50
  tunnel    a running simvm domain of --mib MiB (its memory filled, so every page is
            sent) migrated live, p2p and tunnelled (the memory stream inside srcd's gRPC
            stream to dstd), A -> B -> A ... --reps times per mode, plain and tls
            alternately, with the RPC from this process (no migctl start-up). No
            --undefinesource: the source keeps the domain's definition and answers
            ``domjobinfo --completed`` (GetJobInfo, completed=true) for it. Two figures
            per migration, both from the migration's own statistics:
              tunnel_mb_s      RAM transferred / the stream's own time (QEMU's
                               total-time, srcd's ``perform_completed`` log line)
              tunnel_job_mb_s  RAM transferred / ``Time elapsed`` of domjobinfo
                               --completed (the whole job: Begin .. Confirm, the
                               destination's emulator start included)

Hosts A and B on 127.0.0.2/127.0.0.3 (plaintext) and 127.0.0.4/127.0.0.5 (mTLS,
certificates made with vmmigrate.migctl.certs in the temporary directory), all four up
during the offline and tunnel phases. A summary goes to stdout as the phases end; the last
line is one JSON object with the headline figures (medians, MB = 10^6 bytes) and their
tls/plain ratios; --json writes every sample too.

    .venv/bin/python -m bench.bench_tls --mib 256 --reps 5 [--json out.json]
    .venv/bin/python -m bench.bench_tls --quick     # a smoke run, well under 2 minutes

This is a benchmark script, not a test: it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from vmmigrate.common.flags import MigrateFlag

from bench import bench_offline
from tests.helpers.hosts import Host, sample_domain_xml
from vmmigrate.v1 import vmmigrate_pb2 as pb

MODES = ("plain", "tls")
IPS = {"plain": ("127.0.0.2", "127.0.0.3"), "tls": ("127.0.0.4", "127.0.0.5")}
TUNNEL_FLAGS = (
    MigrateFlag.LIVE | MigrateFlag.PEER2PEER | MigrateFlag.TUNNELLED | MigrateFlag.PERSIST_DEST
)
MIGRATE_TIMEOUT = 300.0
READY_TIMEOUT = 30.0
ROUND = 10  # offline migrations per mode before the other mode's turn
QUICK = {"mib": 64, "reps": 2, "starts": 3, "n": 20, "warmup": 4}


def ratio(tls: float | None, plain: float | None) -> float | None:
    if tls is None or not plain:
        return None
    return round(tls / plain, 3)


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


# ---------------------------------------------------------------------------------------
# daemon start


def _read_until_ready(proc: subprocess.Popen[bytes], t0: float) -> float:
    """Milliseconds from ``t0`` to the moment the ``daemon_ready`` line could be read."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = t0 + READY_TIMEOUT
    while time.perf_counter() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            break  # the daemon exited
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if b"daemon_ready" in line and json.loads(line).get("event") == "daemon_ready":
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError(f"no daemon_ready within {READY_TIMEOUT} s: {buf[-2000:]!r}")


def start_once(kind: str, ip: str, state: Path, flags: list[str]) -> float:
    argv = [
        sys.executable, "-m", f"vmmigrate.{kind}", "--listen", f"{ip}:0",
        "--state-dir", str(state), "--log-format", "json", *flags,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        return _read_until_ready(proc, t0)
    finally:
        proc.terminate()  # this Popen only
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def start_times(
    root: Path, flags: dict[str, list[str]], n: int
) -> dict[str, dict[str, list[float]]]:
    """Per mode and kind, ``n`` timed starts; the modes alternate, order flipped each round."""
    out: dict[str, dict[str, list[float]]] = {m: {"srcd": [], "dstd": []} for m in MODES}
    for mode in MODES:  # untimed: state dir made, interpreter and modules in the cache
        for kind in ("srcd", "dstd"):
            start_once(kind, IPS[mode][0], root / mode / kind, flags[mode])
    for i in range(n):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            for kind in ("srcd", "dstd"):
                out[mode][kind].append(
                    start_once(kind, IPS[mode][0], root / mode / kind, flags[mode])
                )
    return out


# ---------------------------------------------------------------------------------------
# offline p2p latency (bench_offline's loop and client)


async def offline_latency(
    clients: dict[str, bench_offline.Client], warmup: int, n: int
) -> dict[str, list[float]]:
    name = "bench-tls-offline"
    steps = {}
    for mode, client in clients.items():
        await client.define("A", sample_domain_xml(name))
        steps[mode] = bench_offline.p2p_step(client, name)
        await bench_offline.ping_pong(client, name, steps[mode], warmup, 0)
    out: dict[str, list[float]] = {m: [] for m in clients}
    rounds = (n + ROUND - 1) // ROUND
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            k = min(ROUND, n - len(out[mode]))
            out[mode] += await bench_offline.ping_pong(clients[mode], name, steps[mode], 0, k)
    return out


# ---------------------------------------------------------------------------------------
# tunnelled live migration


def stream_ms(host: Host, migration_id: str) -> float | None:
    """QEMU's total-time of the migration stream, from srcd's ``perform_completed``."""
    assert host.srcd is not None
    for event in host.srcd.events():
        if event.get("event") == "perform_completed" and event.get("migration_id") == migration_id:
            total = event.get("total_ms")
            return float(total) if isinstance(total, int | float) and total else None
    return None


async def tunnel_once(
    client: bench_offline.Client, frm: str, to: str, uuid: str
) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = await client.dom[frm].Migrate(
        pb.MigrateRequest(domain=uuid, dest_uri=client.hosts[to].dst, flags=int(TUNNEL_FLAGS)),
        timeout=MIGRATE_TIMEOUT,
    )
    wall = time.perf_counter() - t0
    info = await client.dom[frm].GetJobInfo(
        pb.JobInfoRequest(domain=uuid, completed=True), timeout=bench_offline.RPC_TIMEOUT
    )
    if info.type != "Completed" or info.migration_id != r.migration_id:
        raise RuntimeError(f"domjobinfo --completed on {frm}: {info}")
    # the source's history says how the stream went: through the daemons' own connection
    jobs = await client.dom[frm].ListJobs(
        pb.ListJobsRequest(domain=uuid), timeout=bench_offline.RPC_TIMEOUT
    )
    modes = [j.mode for j in jobs.jobs if j.migration_id == r.migration_id]
    if modes != ["tunnelled"]:
        raise RuntimeError(f"migration {r.migration_id} ran as {modes}, not tunnelled")
    sent = info.data_processed
    total_ms = stream_ms(client.hosts[frm], r.migration_id)
    return {
        "migration_id": r.migration_id,
        "direction": f"{frm}->{to}",
        "bytes": sent,
        "stream_ms": total_ms,
        "elapsed_ms": info.time_elapsed_ms,
        "downtime_ms": info.downtime_ms,
        "rpc_wall_ms": round(wall * 1000, 1),
        "mb_s": round(sent / total_ms / 1e3, 1) if total_ms else None,
        "job_mb_s": round(sent / info.time_elapsed_ms / 1e3, 1) if info.time_elapsed_ms else None,
    }


async def tunnel(
    clients: dict[str, bench_offline.Client], mib: int, reps: int
) -> dict[str, list[dict[str, Any]]]:
    uuid = str(uuidlib.uuid4())
    name = "bench-tls-live"
    for client in clients.values():
        await client.define("A", sample_domain_xml(name, uuid, memory_mib=mib))
        await client.dom["A"].Start(pb.DomainRequest(domain=uuid), timeout=MIGRATE_TIMEOUT)
    where = {m: "A" for m in clients}
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in clients}
    for i in range(reps):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            frm = where[mode]
            to = bench_offline.other(frm)
            row = await tunnel_once(clients[mode], frm, to, uuid)
            out[mode].append(row)
            where[mode] = to
            print(f"  tunnel {mode:5s} {row['direction']} {row['bytes'] / 1e6:.0f} MB: "
                  f"stream {row['mb_s']} MB/s, job {row['job_mb_s']} MB/s", flush=True)
    return out


# ---------------------------------------------------------------------------------------
# main


async def with_hosts(
    hosts: dict[str, tuple[Host, Host]], client_tls: Path, args: argparse.Namespace
) -> dict[str, Any]:
    clients = {
        mode: bench_offline.Client(a, b, client_tls if mode == "tls" else None)
        for mode, (a, b) in hosts.items()
    }
    try:
        for c in clients.values():
            await c.ready()
        offline = await offline_latency(clients, args.warmup, args.n)
        for mode, times in offline.items():
            print(f"  offline p2p {mode:5s} p50 {bench_offline.pct(times, 50):.2f} ms", flush=True)
        return {"offline_ms": offline, "tunnel": await tunnel(clients, args.mib, args.reps)}
    finally:
        for c in clients.values():
            await c.close()


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    client_tls, certs = bench_offline.make_pki(root / "pki", [*IPS["tls"]])
    flags = {"plain": [[], []], "tls": [["--tls-dir", str(c)] for c in certs]}
    print(f"start: {args.starts} starts per daemon and mode", flush=True)
    starts = start_times(root / "start", {m: f[0] for m, f in flags.items()}, args.starts)
    for mode, kinds in starts.items():
        print(f"  start {mode:5s} " + ", ".join(f"{k} {med(v)} ms" for k, v in kinds.items()))
    hosts: dict[str, tuple[Host, Host]] = {}
    try:
        for mode in MODES:
            pair = tuple(
                Host(n, ip, root / mode / n) for n, ip in zip("AB", IPS[mode], strict=True)
            )
            hosts[mode] = (pair[0], pair[1])
            for h, f in zip(pair, flags[mode], strict=True):
                h.start(f, f)
        print(f"offline: {args.warmup} warm-up + {args.n} timed p2p migrations per mode; "
              f"tunnel: {args.reps} live migrations of {args.mib} MiB per mode", flush=True)
        measured = asyncio.run(with_hosts(hosts, client_tls, args))
    finally:
        for pair in hosts.values():
            for h in pair:  # its own daemons' Popen and recorded emulator pids, nothing else
                h.stop()
    return {"start_ms": starts, **measured}


def headline(results: dict[str, Any]) -> dict[str, Any]:
    off = {m: bench_offline.pct(v, 50) for m, v in results["offline_ms"].items()}
    tun = {m: med([r["mb_s"] for r in rows if r["mb_s"]]) for m, rows in
           results["tunnel"].items()}
    job = {m: med([r["job_mb_s"] for r in rows if r["job_mb_s"]]) for m, rows in
           results["tunnel"].items()}
    start = {m: {k: med(v) for k, v in kinds.items()} for m, kinds in results["start_ms"].items()}
    return {
        "offline_p2p_p50_ms_plain": round(off["plain"], 3),
        "offline_p2p_p50_ms_tls": round(off["tls"], 3),
        "offline_p2p_p50_ratio": ratio(off["tls"], off["plain"]),
        "tunnel_mb_s_plain": tun["plain"],
        "tunnel_mb_s_tls": tun["tls"],
        "tunnel_mb_s_ratio": ratio(tun["tls"], tun["plain"]),
        "tunnel_job_mb_s_plain": job["plain"],
        "tunnel_job_mb_s_tls": job["tls"],
        "tunnel_job_mb_s_ratio": ratio(job["tls"], job["plain"]),
        "start_ms_plain": start["plain"],
        "start_ms_tls": start["tls"],
        "start_ms_ratio": {k: ratio(start["tls"][k], start["plain"][k]) for k in start["tls"]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="guest memory, MiB")
    ap.add_argument("--reps", type=int, default=5, help="tunnelled migrations per mode")
    ap.add_argument("--starts", type=int, default=7, help="timed starts per daemon and mode")
    ap.add_argument("--n", type=int, default=100, help="timed offline p2p migrations per mode")
    ap.add_argument("--warmup", type=int, default=10, help="untimed offline migrations first")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: " + ", ".join(f"--{k} {v}" for k, v in QUICK.items()))
    ap.add_argument("--json", help="write every sample here too")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": bench_offline.machine_info(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="vmm-bench-tls-") as tmp:
        results.update(run(Path(tmp), args))
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    results["headline"] = headline(results)
    print(f"runtime {results['runtime_s']} s; load average before {results['loadavg_before']}, "
          f"after {results['loadavg_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["headline"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
