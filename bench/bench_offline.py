#!/usr/bin/env python3
"""Offline migration benchmark: latency (p2p and client-driven) and evacuation throughput.

Starts two real hosts (a srcd and a dstd each, as separate processes) on 127.0.0.2 and
127.0.0.3 in a temporary directory, drives them with in-process gRPC clients (warm
channels, no migctl process start-up in the timing) and prints a result table; --json
writes the same results as JSON.

    .venv/bin/python -m bench.bench_offline --json /tmp/bench.json

Phases:
  latency   one domain migrated back and forth A -> B -> A ... (--warmup untimed, then --n
            timed), each Migrate RPC timed on its own; then the same in client-driven mode
            (the client calls dstd.GetCapabilities, srcd.Begin, dstd.Prepare, dstd.Finish,
            srcd.Confirm itself: migctl.managed's sequence, with warm channels), and once
            more with migctl.managed.migrate as migctl runs it (a new channel to the
            destination per migration).
  evac      --domains domains defined on A, all migrated A -> B, then B -> A, for every T
            in --clients, by two paths interleaved: one MigrateMany call with --parallel T
            (what migctl evacuate sends; path "many"), and one Migrate per domain from T
            concurrent clients (each its own channel, the domains split between them; path
            "unary"); after each direction both hosts are listed and every domain must be
            on exactly one host (the expected one).

With --profile DIR an extra, separately reported p2p loop runs with py-spy attached to the
four daemons (py-spy must be on PATH or in the venv); its numbers are not the clean ones.
This is a benchmark script, not a test: the loops are bounded and it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.rpc import Deadline
from vmmigrate.migctl import managed

from tests.helpers.hosts import Host, sample_domain_xml
from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

P2P_FLAGS = (
    MigrateFlag.OFFLINE
    | MigrateFlag.PERSIST_DEST
    | MigrateFlag.PEER2PEER
    | MigrateFlag.UNDEFINE_SOURCE
)  # 0x41a
MANAGED_FLAGS = P2P_FLAGS & ~MigrateFlag.PEER2PEER  # 0x418
assert int(P2P_FLAGS) == 0x41A

CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
RPC_TIMEOUT = 60.0
TARGET_P50_MS = 8.0


# ---------------------------------------------------------------------------------------
# statistics and machine facts


def pct(xs: Sequence[float], p: float) -> float:
    """Percentile with linear interpolation (numpy's default, as libvirt-lab's scripts)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def summarize(ms: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50": round(pct(ms, 50), 3),
        "p90": round(pct(ms, 90), 3),
        "p99": round(pct(ms, 99), 3),
        "mean": round(statistics.mean(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "mem_total_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
    }


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class CpuMeter:
    """CPU seconds used by each daemon (and this client process) over a phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.start: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self.start = {k: proc_cpu_s(p) for k, p in self.pids.items()}
        self.start["client"] = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {k: proc_cpu_s(p) - self.start[k] for k, p in self.pids.items()}
        self.used["client"] = time.process_time() - self.start["client"]

    def per_migration_ms(self, count: int) -> dict[str, float]:
        return {k: round(v * 1000 / count, 3) for k, v in self.used.items()}


# ---------------------------------------------------------------------------------------
# the client


class Client:
    """Warm channels to both daemons of both hosts."""

    def __init__(self, a: Host, b: Host, tls: Path | None = None) -> None:
        self.tls = tls  # a client certificate's directory: mTLS to every daemon
        self.hosts = {"A": a, "B": b}
        self.channels: list[grpc.aio.Channel] = []
        self.dom: dict[str, pb_grpc.DomainServiceStub] = {}
        self.src: dict[str, pb_grpc.MigrationSourceServiceStub] = {}
        self.dst: dict[str, pb_grpc.MigrationDestinationServiceStub] = {}
        for name, h in self.hosts.items():
            sc = self._open(h.src)
            dc = self._open(h.dst)
            self.dom[name] = pb_grpc.DomainServiceStub(sc)
            self.src[name] = pb_grpc.MigrationSourceServiceStub(sc)
            self.dst[name] = pb_grpc.MigrationDestinationServiceStub(dc)

    def _open(self, address: str) -> grpc.aio.Channel:
        ch = open_bench_channel(address, self.tls)
        self.channels.append(ch)
        return ch

    async def ready(self) -> None:
        for ch in self.channels:
            await asyncio.wait_for(ch.channel_ready(), 20)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close(None)

    async def define(self, host: str, xml: str) -> None:
        await self.dom[host].Define(pb.DefineRequest(xml=xml), timeout=RPC_TIMEOUT)

    async def names(self, host: str) -> list[str]:
        r = await self.dom[host].List(pb.ListRequest(all=True), timeout=RPC_TIMEOUT)
        return [e.domain.name for e in r.domains]


def open_bench_channel(address: str, tls: Path | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    creds = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(), (tls / "key.pem").read_bytes(), (tls / "cert.pem").read_bytes()
    )
    return grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)


def make_pki(root: Path, ips: Sequence[str]) -> tuple[Path, list[Path]]:
    """--tls: a CA, an admin client and one host certificate per IP (vmmigrate.migctl.certs)."""
    from vmmigrate.migctl import certs

    certs.init_ca(root / "ca", force=True)
    certs.issue_client(root / "ca", name="bench", role="admin", out=root / "client")
    hosts = []
    for i, ip in enumerate(ips):
        out = root / f"host{i}"
        certs.issue_host(root / "ca", name=f"host{i}", ips=[ip], out=out)
        hosts.append(out)
    return root / "client", hosts


def other(host: str) -> str:
    return "B" if host == "A" else "A"


async def migrate_p2p(
    dom: pb_grpc.DomainServiceStub, name: str, dest_uri: str
) -> pb.MigrateResponse:
    return await dom.Migrate(
        pb.MigrateRequest(domain=name, dest_uri=dest_uri, flags=int(P2P_FLAGS)),
        timeout=RPC_TIMEOUT,
    )


# ---------------------------------------------------------------------------------------
# latency

Step = Callable[[str, str], Any]  # (from_host, to_host) -> awaitable


async def ping_pong(client: Client, name: str, step: Step, warmup: int, n: int) -> list[float]:
    """Migrate ``name`` A -> B -> A ... ``warmup`` + ``n`` times; the last ``n`` timed."""
    where = "A"
    times: list[float] = []
    for i in range(warmup + n):
        to = other(where)
        t0 = time.perf_counter()
        await step(where, to)
        dt = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            times.append(dt)
        where = to
    if where != "A":  # leave it on A
        await step(where, "A")
    return times


def p2p_step(client: Client, name: str) -> Step:
    async def step(frm: str, to: str) -> None:
        r = await migrate_p2p(client.dom[frm], name, client.hosts[to].dst)
        assert r.dest_domain.name == name, r

    return step


def managed_step(client: Client, name: str) -> Step:
    """migctl's client-driven sequence (migctl.managed) over the bench's warm channels."""

    async def step(frm: str, to: str) -> None:
        d = await managed._run(
            source=client.src[frm],
            source_address=client.hosts[frm].src,
            # through the source's relay, as migctl does (dstd takes host certificates only)
            dest=managed.RelayedDestination(client.src[frm], client.hosts[to].dst),
            dest_address=client.hosts[to].dst,
            domain=name,
            flags=MANAGED_FLAGS,
            params=pb.MigrationParams(),
            mid=f"bench-{time.monotonic_ns()}",
            deadline=Deadline(RPC_TIMEOUT),
        )
        assert d.name == name, d

    return step


def migctl_step(client: Client, name: str) -> Step:
    """migctl.managed.migrate as migctl calls it: a new channel to the destination each time."""

    async def step(frm: str, to: str) -> None:
        d = await managed.migrate(
            source=client.src[frm],
            source_address=client.hosts[frm].src,
            dest_address=client.hosts[to].dst,
            domain=name,
            flags=MANAGED_FLAGS,
            params=pb.MigrationParams(),
            migration_id=None,
            deadline=Deadline(RPC_TIMEOUT),
        )
        assert d.name == name, d

    return step


async def latency(
    client: Client, pids: dict[str, int], warmup: int, n: int
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    modes: list[tuple[str, str, Callable[[Client, str], Step]]] = [
        ("p2p", "p2p: DomainService.Migrate, flags 0x41a", p2p_step),
        ("managed", "client-driven: Begin, relayed caps/Prepare/Finish, Confirm, warm", managed_step),
        ("managed_migctl", "client-driven: managed.migrate (new dest channel)", migctl_step),
    ]
    for key, label, make in modes:
        name = f"bench-lat-{key}"
        await client.define("A", sample_domain_xml(name))
        step = make(client, name)
        await ping_pong(client, name, step, warmup, 0)  # warm-up, untimed
        with CpuMeter(pids) as cpu:
            times = await ping_pong(client, name, step, 0, n)
        res: dict[str, Any] = summarize(times)
        res["label"] = label
        res["cpu_ms_per_migration"] = cpu.per_migration_ms(len(times))
        res["samples_ms"] = [round(t, 3) for t in times]
        out[key] = res
        a, b = await client.names("A"), await client.names("B")
        assert name in a and name not in b, (a, b)
        print(f"  {key:15s} p50 {res['p50']:7.2f} ms  p99 {res['p99']:7.2f} ms", flush=True)
    return out


# ---------------------------------------------------------------------------------------
# evacuation throughput


async def evacuate_many(
    hosts: dict[str, Host], names: list[str], frm: str, to: str, parallel: int,
    tls: Path | None = None,
) -> dict[str, Any]:
    """Migrate ``names`` frm -> to in one MigrateMany call (what migctl evacuate sends),
    from a warm channel: the daemons' part of ``migctl evacuate --offline``."""
    ch = open_bench_channel(hosts[frm].src, tls)
    errors: list[str] = []
    ok = 0
    try:
        await asyncio.wait_for(ch.channel_ready(), 20)
        dom = pb_grpc.DomainServiceStub(ch)
        start = pb.MigrateManyStart(
            dest_uri=hosts[to].dst, flags=int(MigrateFlag.PEER2PEER), domains=names,
            selection=pb.SELECT_OFFLINE, parallel=parallel,
        )
        t0 = time.perf_counter()
        call = dom.MigrateMany(iter([pb.MigrateManyRequest(start=start)]), timeout=1800)
        async for msg in call:
            for r in msg.results:
                if r.HasField("error"):
                    errors.append(f"{r.domain}: {r.error.code}: {r.error.message}")
                else:
                    ok += 1
        wall = time.perf_counter() - t0
    finally:
        await ch.close(None)
    return {
        "direction": f"{frm}->{to}",
        "clients": parallel,
        "ok": ok,
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": round(wall, 3),
        "migr_per_s": round(ok / wall, 1),
        "lat_ms": {},
    }


async def evacuate(
    hosts: dict[str, Host], names: list[str], frm: str, to: str, clients: int,
    tls: Path | None = None,
) -> dict[str, Any]:
    """Migrate ``names`` frm -> to with ``clients`` concurrent clients, own channel each."""
    chunks = [names[k::clients] for k in range(clients)]
    channels = [
        open_bench_channel(hosts[frm].src, tls) for _ in range(clients)
    ]
    dest_uri = hosts[to].dst
    lat: list[float] = []
    errors: list[str] = []
    try:
        for ch in channels:  # connection setup is not timed
            await asyncio.wait_for(ch.channel_ready(), 20)
        start = asyncio.Event()

        async def worker(ch: grpc.aio.Channel, mine: list[str]) -> None:
            dom = pb_grpc.DomainServiceStub(ch)
            await start.wait()
            for nm in mine:
                t0 = time.perf_counter()
                try:
                    await migrate_p2p(dom, nm, dest_uri)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{nm}: {exc.code().name}: {exc.details()}")
                    continue
                lat.append((time.perf_counter() - t0) * 1000)

        tasks = [
            asyncio.ensure_future(worker(ch, c)) for ch, c in zip(channels, chunks, strict=True)
        ]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    finally:
        for ch in channels:
            await ch.close(None)
    return {
        "direction": f"{frm}->{to}",
        "clients": clients,
        "ok": len(lat),
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": round(wall, 3),
        "migr_per_s": round(len(lat) / wall, 1),
        "lat_ms": summarize(lat) if lat else {},
    }


async def verify_placement(client: Client, names: list[str], expect: str) -> dict[str, Any]:
    """Every domain on exactly one host, and that host the expected one."""
    on = {h: set(await client.names(h)) for h in ("A", "B")}
    both = [n for n in names if n in on["A"] and n in on["B"]]
    neither = [n for n in names if n not in on["A"] and n not in on["B"]]
    wrong = [n for n in names if n in on[other(expect)] and n not in on[expect]]
    return {
        "expected_host": expect,
        "on_A": len([n for n in names if n in on["A"]]),
        "on_B": len([n for n in names if n in on["B"]]),
        "on_both": both[:5],
        "on_neither": neither[:5],
        "on_wrong_host": wrong[:5],
        "ok": not both and not neither and not wrong,
    }


async def define_all(client: Client, names: list[str]) -> float:
    """Define ``names`` on host A (8 Define calls at a time), checked to be there and on A
    only; returns the seconds it took."""
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(8)

    async def define(nm: str) -> None:
        async with sem:
            await client.define("A", sample_domain_xml(nm))

    await asyncio.gather(*(define(nm) for nm in names))
    define_s = time.perf_counter() - t0
    check = await verify_placement(client, names, "A")
    assert check["ok"], check
    return define_s


async def throughput(
    client: Client, pids: dict[str, int], n_domains: int, levels: list[int],
    paths: Sequence[str] = ("many", "unary"),
) -> dict[str, Any]:
    """Evacuations of ``n_domains`` A -> B and back at each level, by each path, interleaved:
    ``many`` one MigrateMany call with --parallel = level (what migctl evacuate sends),
    ``unary`` one Migrate RPC per domain from level concurrent clients."""
    names = [f"evac-{i:04d}" for i in range(n_domains)]
    define_s = await define_all(client, names)
    runs = []
    for t in levels:
        for path in paths:
            for frm, to in (("A", "B"), ("B", "A")):
                with CpuMeter(pids) as cpu:
                    if path == "many":
                        r = await evacuate_many(client.hosts, names, frm, to, t, client.tls)
                    else:
                        r = await evacuate(client.hosts, names, frm, to, t, client.tls)
                r["path"] = path
                r["cpu_ms_per_migration"] = cpu.per_migration_ms(max(r["ok"], 1))
                r["verify"] = await verify_placement(client, names, to)
                runs.append(r)
                print(
                    f"  {path:5} {t:2d} {frm}->{to}: {r['migr_per_s']:7.1f} migrations/s"
                    f"  ({r['ok']} ok, {r['errors']} errors, placement ok={r['verify']['ok']})",
                    flush=True,
                )
    return {"domains": n_domains, "define_all_s": round(define_s, 3), "runs": runs}


# ---------------------------------------------------------------------------------------
# profiling (optional)


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def profile(
    client: Client, pids: dict[str, int], out_dir: Path, n: int, rate: int
) -> dict[str, Any]:
    exe = find_py_spy()
    if exe is None:
        return {"error": "py-spy not found (pip install py-spy into the venv)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "bench-profile"
    await client.define("A", sample_domain_xml(name))
    step = p2p_step(client, name)
    await ping_pong(client, name, step, 20, 0)
    spies = {}
    for key, pid in pids.items():
        spies[key] = subprocess.Popen(
            [
                exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                "--output", str(out_dir / f"{key}.folded"), "--nonblocking",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    await asyncio.sleep(2.0)  # let py-spy attach
    times = await ping_pong(client, name, step, 0, n)
    for p in spies.values():
        p.send_signal(signal.SIGINT)
    errors = {}
    for key, p in spies.items():
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errors[key] = err.decode(errors="replace")[-500:]
    return {"out_dir": str(out_dir), "latency_under_py_spy": summarize(times), "errors": errors}


# ---------------------------------------------------------------------------------------
# report


def machine_line(m: dict[str, Any]) -> str:
    """machine_info() in one line of a report."""
    return (
        f"machine: {m['nproc']} CPU(s), {m['cpu_model']}, {m['mem_total_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, grpcio {m['grpcio']}"
    )


def runtime_line(results: dict[str, Any], note: str = "") -> str:
    """The run's wall time and the load average around it (end_results), in one line."""
    return (
        f"total runtime: {results['runtime_s']:.1f} s; load average before "
        f"{results['loadavg_before']}, after {results['loadavg_after']}{note}"
    )


def table(results: dict[str, Any]) -> str:
    lines = [
        "",
        "vmmigrate offline migration benchmark",
        machine_line(results["machine"]),
        "",
        f"latency (ms), one Migrate per row sample, n={results['params']['n']} "
        f"after {results['params']['warmup']} warm-up",
        f"{'mode':16s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'mean':>8s} {'min':>8s} {'max':>8s}"
        f"   cpu ms/migr (srcd+dstd, both hosts)",
    ]
    for key, r in results["latency"].items():
        cpu = r["cpu_ms_per_migration"]
        daemons = sum(v for k, v in cpu.items() if k != "client")
        lines.append(
            f"{key:16s} {r['p50']:8.2f} {r['p90']:8.2f} {r['p99']:8.2f} {r['mean']:8.2f} "
            f"{r['min']:8.2f} {r['max']:8.2f}   {daemons:.2f}"
        )
    p50 = results["latency"]["p2p"]["p50"]
    verdict = "meets" if p50 <= TARGET_P50_MS else "MISSES"
    lines.append(f"target: p2p p50 <= {TARGET_P50_MS} ms -> {verdict} ({p50:.2f} ms)")
    tp = results["throughput"]
    lines += [
        "",
        f"evacuation throughput, {tp['domains']} domains, p2p offline undefinesource",
        f"{'clients':>7s} {'dir':>5s} {'migr/s':>8s} {'wall s':>7s} {'ok':>5s} {'err':>4s} "
        f"{'p50 ms':>7s} {'p99 ms':>7s}  placement",
    ]
    for r in tp["runs"]:
        lat = r["lat_ms"] or {"p50": float("nan"), "p99": float("nan")}
        lines.append(
            f"{r['clients']:7d} {r['direction']:>5s} {r['migr_per_s']:8.1f} {r['wall_s']:7.2f} "
            f"{r['ok']:5d} {r['errors']:4d} {lat['p50']:7.2f} {lat['p99']:7.2f}  "
            f"{'ok' if r['verify']['ok'] else 'FAILED ' + json.dumps(r['verify'])}"
        )
    if "profile" in results:
        pr = results["profile"]
        lines += ["", f"profile (py-spy attached, not clean numbers): {json.dumps(pr)}"]
    lines.append(f"daemon RSS at end (MiB): {json.dumps(results['rss_mib_end'])}")
    lines.append(f"idle CPU (ms per s): {json.dumps(results['idle_cpu_ms_per_s'])}")
    lines.append(
        runtime_line(
            results,
            " (2 cores: the bench itself adds ~1-2; much more means other work ran alongside)",
        )
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# main


def add_host_options(ap: argparse.ArgumentParser) -> None:
    """The options of the two hosts and of the results (bench_evacuate's too)."""
    ap.add_argument("--json", help="write the results as JSON to this path")
    ap.add_argument("--ips", default="127.0.0.2,127.0.0.3", help="loopback IPs of hosts A,B")
    ap.add_argument("--workdir", help="keep state and daemon logs here (default: temp dir)")


def new_results(params: dict[str, Any]) -> dict[str, Any]:
    """The results' head: the machine, ``params`` with the command line, and the load average
    before the run (other work on the machine skews every number here: compare it with ~0)."""
    return {
        "machine": machine_info(),
        "params": {**params, "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }


def end_results(
    results: dict[str, Any],
    started: float,
    table: Callable[[dict[str, Any]], str],
    json_path: str | None,
) -> None:
    """Add the run's wall time (since ``started``, a perf_counter) and the load average
    after it; print the results' ``table``, and write them as JSON to ``json_path`` if
    given."""
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"JSON written to {json_path}")


def bench_root(stack: contextlib.ExitStack, workdir: str | None, prefix: str) -> Path:
    """--workdir (kept), else a temporary directory removed when ``stack`` closes."""
    if workdir:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        return root
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


@contextlib.contextmanager
def two_hosts(
    root: Path, ips: str, flags: tuple[list[str], list[str]] = ([], [])
) -> Iterator[tuple[Host, Host]]:
    """Hosts A and B (a srcd and a dstd each, with ``flags``' A and B options) on the two IPs
    of ``ips`` (comma-separated), under ``root``; stopped at the end."""
    hosts: list[Host] = []
    try:
        for name, ip, extra in zip("AB", ips.split(","), flags, strict=True):
            host = Host(name, ip, root / name)
            hosts.append(host)
            host.start(extra, extra)
        a, b = hosts
        print(f"hosts: A srcd {a.src} dstd {a.dst}; B srcd {b.src} dstd {b.dst}", flush=True)
        yield a, b
    finally:
        for h in hosts:  # Daemon.stop() signals its own Popen (by pid), nothing broader
            h.stop()


def daemon_pids(a: Host, b: Host) -> dict[str, int]:
    """The four daemons' pids, by "A.srcd" ... (what CpuMeter measures)."""
    assert a.srcd and a.dstd and b.srcd and b.dstd
    return {
        "A.srcd": a.srcd.proc.pid,
        "A.dstd": a.dstd.proc.pid,
        "B.srcd": b.srcd.proc.pid,
        "B.dstd": b.dstd.proc.pid,
    }


async def run(args: argparse.Namespace, a: Host, b: Host) -> dict[str, Any]:
    pids = daemon_pids(a, b)
    client = Client(a, b, args.client_tls)
    await client.ready()
    results: dict[str, Any] = {}
    try:
        with CpuMeter(pids) as idle:  # background cost (keepalives, timers), for reference
            await asyncio.sleep(args.idle_s)
        results["idle_cpu_ms_per_s"] = {
            k: round(v * 1000 / args.idle_s, 2) for k, v in idle.used.items()
        }
        print(f"latency: {args.warmup} warm-up + {args.n} timed migrations per mode", flush=True)
        results["latency"] = await latency(client, pids, args.warmup, args.n)
        levels = [int(x) for x in args.clients.split(",")]
        print(f"throughput: {args.domains} domains, clients {levels}", flush=True)
        results["throughput"] = await throughput(client, pids, args.domains, levels)
        results["rss_mib_end"] = {k: proc_rss_mib(p) for k, p in pids.items()}
        if args.profile:
            print("profile: p2p loop under py-spy", flush=True)
            results["profile"] = await profile(
                client, pids, Path(args.profile), args.n, args.profile_rate
            )
    finally:
        await client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="timed migrations per latency mode")
    ap.add_argument("--warmup", type=int, default=20, help="untimed migrations per mode first")
    ap.add_argument("--domains", type=int, default=300, help="domains in the evacuation phase")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    add_host_options(ap)
    ap.add_argument("--idle-s", type=float, default=3.0, help="idle CPU sample, seconds")
    ap.add_argument("--tls", action="store_true", help="mutual TLS: certificates made in the workdir")
    ap.add_argument("--profile", metavar="DIR", help="also run a p2p loop under py-spy")
    ap.add_argument("--profile-rate", type=int, default=1000, help="py-spy samples/s")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    results = new_results(
        {
            "n": args.n,
            "warmup": args.warmup,
            "domains": args.domains,
            "clients": args.clients,
            "p2p_flags": hex(int(P2P_FLAGS)),
            "managed_flags": hex(int(MANAGED_FLAGS)),
        }
    )
    with contextlib.ExitStack() as stack:
        root = bench_root(stack, args.workdir, "vmm-bench-")
        flags: tuple[list[str], list[str]] = ([], [])
        args.client_tls = None
        if args.tls:
            args.client_tls, (tls_a, tls_b) = make_pki(root / "pki", args.ips.split(","))
            flags = (["--tls-dir", str(tls_a)], ["--tls-dir", str(tls_b)])
        results["params"]["tls"] = bool(args.tls)
        a, b = stack.enter_context(two_hosts(root, args.ips, flags))
        results.update(asyncio.run(run(args, a, b)))
    end_results(results, started, table, args.json)
    ok = all(r["verify"]["ok"] and not r["errors"] for r in results["throughput"]["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
