#!/usr/bin/env python3
"""What mutual TLS costs, plaintext against mTLS in the same run, with real daemons.

  start     time from spawning a daemon to its ``daemon_ready`` line, --starts times for
            each of srcd and dstd, plaintext and with --tls-dir (certificates read and
            checked, TLS credentials built)
  tunnel    a running simvm domain of --mib MiB migrated live, p2p and tunnelled (the
            memory stream inside srcd's gRPC stream to dstd), A -> B -> A ... --reps times
            per mode, through migctl; throughput = memory size / migctl's wall time, and
            ``domjobinfo --completed``'s data processed over its elapsed time

Hosts A and B on 127.0.0.2/127.0.0.3 (plaintext) and 127.0.0.4/127.0.0.5 (mTLS, certificates
made with vmmigrate.migctl.certs in the temporary directory).

    .venv/bin/python -m bench.bench_tls --mib 256 --reps 5 [--json out.json]

This is a benchmark script, not a test: it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from vmmigrate.migctl import certs

from tests.helpers.hosts import Host, sample_domain_xml


def make_pki(root: Path, ips: list[str]) -> tuple[Path, list[Path]]:
    certs.init_ca(root / "ca")
    certs.issue_client(root / "ca", name="bench", role="admin", out=root / "client")
    hosts = []
    for i, ip in enumerate(ips):
        certs.issue_host(root / "ca", name=f"host{i}", ips=[ip], out=root / f"host{i}")
        hosts.append(root / f"host{i}")
    return root / "client", hosts


def start_times(root: Path, ip: str, flags: list[str], n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind in ("srcd", "dstd"):
        times = []
        for i in range(n):
            h = Host(f"S{i}", ip, root / f"{kind}-{i}")
            t0 = time.perf_counter()
            d = h.start_srcd(flags) if kind == "srcd" else h.start_dstd(flags)
            times.append((time.perf_counter() - t0) * 1000)
            d.stop()
        out[kind] = round(statistics.median(times), 1)
    return out


def completed_mib_s(h: Host, name: str) -> float | None:
    r = h.migctl("domjobinfo", name, "--completed", check=False)
    if r.returncode != 0:
        return None
    text = r.stdout
    rows = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    elapsed_ms = float(rows["Time elapsed"].split()[0])
    mib = float(rows["Data processed"].split()[0])
    return mib / (elapsed_ms / 1000) if elapsed_ms else 0.0


def tunnel_run(a: Host, b: Host, mib: int, reps: int) -> dict[str, Any]:
    name = f"bench-tls-{uuidlib.uuid4().hex[:8]}"
    u = str(uuidlib.uuid4())
    a.define(sample_domain_xml(name, u, memory_mib=mib), f"{name}.xml")
    a.migctl("start", name)
    walls, rates = [], []
    where, there = a, b
    for _ in range(reps):
        t0 = time.perf_counter()
        where.migctl("migrate", "--live", "--p2p", "--tunnelled", "--persistent",
                     "--undefinesource", name, there.dst)
        wall = time.perf_counter() - t0
        walls.append(mib / wall)
        rate = completed_mib_s(where, u)
        if rate is not None:
            rates.append(rate)
        where, there = there, where
    where.migctl("destroy", name)
    return {
        "wall_mib_s": round(statistics.median(walls), 1),
        "job_mib_s": round(statistics.median(rates), 1) if rates else None,
        "reps": reps,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="guest memory, MiB")
    ap.add_argument("--reps", type=int, default=5, help="tunnelled migrations per mode")
    ap.add_argument("--starts", type=int, default=5, help="daemon starts per kind and mode")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    results: dict[str, Any] = {"params": vars(args), "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="vmm-bench-tls-") as tmp:
        root = Path(tmp)
        client, (ha, hb) = make_pki(root / "pki", ["127.0.0.4", "127.0.0.5"])
        modes = {
            "plaintext": (["127.0.0.2", "127.0.0.3"], [], [], []),
            "mtls": (["127.0.0.4", "127.0.0.5"], ["--tls-dir", str(ha)], ["--tls-dir", str(hb)],
                     ["--tls-dir", str(client)]),
        }
        for mode, (ips, fa, _fb, _fc) in modes.items():
            results.setdefault("start_ms", {})[mode] = start_times(root / mode, ips[0], fa, args.starts)
        for mode, (ips, fa, fb, fc) in modes.items():
            a = Host("A", ips[0], root / mode / "A", migctl_args=fc)
            b = Host("B", ips[1], root / mode / "B", migctl_args=fc)
            try:
                a.start(fa, fa)
                b.start(fb, fb)
                results.setdefault("tunnel", {})[mode] = tunnel_run(a, b, args.mib, args.reps)
            finally:
                a.stop()
                b.stop()
    results["loadavg_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
