"""bench/run: every figure of the performance issue (issue 12) in one command.

    bench/run [--quick] [--no-libvirt] [--libvirt-lab DIR] [--lab-state DIR]
              [--only STEP,...] [--no-docs] [--workdir DIR] [--json PATH]

Runs the benchmarks below one after the other, vmmigrate's and libvirt's interleaved (each
of vmmigrate's followed at once by libvirt's counterpart), so that both see the same
machine; prints the table (metric, vmmigrate, libvirt, ratio, target, met?), draws the
plots into docs/ (bench-offline-cdf.png, bench-evacuation.png, bench-live.png; matplotlib,
the optional ``bench`` extra), rewrites the section of docs/PERFORMANCE.md between its
``bench/run`` markers, and prints on its last line one JSON object with every metric
(null where it could not be measured; ``why_null`` says why).

Steps (``--only`` takes these names):

  offline        bench_offline: offline latency (one inactive domain A -> B -> A ..., p2p
                 and client-driven, warm channels) and evacuation (N inactive domains
                 A -> B and back, at 1, 4 and 16: one MigrateMany call with that
                 --parallel, what migctl evacuate sends, the target row; and one Migrate
                 per domain from that many in-process clients, interleaved with it;
                 A -> B is reported).
  lv_offline     the lab's lv_bench_api.py: the same latencies through libvirt's API.
  lv_evac        the lab's lv_evac_bench.py: the same evacuation, 1/4/16 API threads.
  evacuate       bench_evacuate: ``migctl evacuate --offline --parallel 1/4/16``.
  live           bench_live: live migration of a 512 MiB QEMU guest with 400 MiB random
                 RAM at 10 GiB/s; migctl direct and tunnelled (and its RPC variants and
                 raw QMP baselines); then ``migctl --version`` (migctl's start-up).
  lv_live        the lab's lv_live_bench.py: ``virsh migrate --live --p2p``, native.
  lv_live_tunnel the same, ``--tunnelled``.
  live_cap       bench_live again at a 400 MiB/s cap: tunnelled / direct throughput.
  tunnel         bench_tunnel: the tunnel stream alone (informative).
  scale          fresh hosts: idle daemon RSS; offline p2p p50 with 10 domains on the
                 source, ``migctl list`` one-shot, daemon restart; the same with the large
                 count (10,000) and the RSS then.
  lv_oneshot     ``virsh list --all`` one-shot; libvirtd's RSS.

A step that fails leaves its metrics null with the reason and the run goes on. libvirt's
steps need the lab (../shared/anchors/libvirt-lab): it is brought up when it is down (root;
it installs Debian's packages when missing) and down at the end only then; without it (not
root, no packages, ``--no-libvirt``) every ``libvirt_`` figure is null, with the reason.

``--quick`` runs the same steps with fewer repetitions and smaller counts (see QUICK) in
under five minutes; the output and the document say so. The metrics' definitions are in
docs/PERFORMANCE.md, section "Figures (bench/run)" and the "Benchmarks" list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import bench_evacuate, bench_grpc_floor, bench_live, bench_offline, bench_tunnel
from bench import figures_report as report
from bench.bench_guest import DEFAULT_LAB, libvirt_version, open_lab
from bench.figures_lab import LabRunner, median_or_none, rss_mb
from tests.helpers.hosts import Daemon, Host, sample_domain_xml

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "PERFORMANCE.md"
LEVELS = "1,4,16"
SMALL = 10  # the scale step's small domain count
IDLE_S = 2.0  # how long the fresh daemons idle before their RSS is read
LIVE_CAP_MIB = 400


@dataclasses.dataclass(frozen=True)
class Sizes:
    offline_n: int  # timed offline migrations per mode (libvirt: n/2 domains x 2 hops)
    offline_warmup: int
    evac_domains: int  # bench_offline's and libvirt's evacuation
    evacuate_domains: int  # migctl evacuate
    live_n: int  # live migrations per variant (libvirt: per mode)
    live_cap_n: int  # the same at the 400 MiB/s cap
    tunnel_mib: int
    tunnel_reps: int
    scale_domains: int
    scale_n: int  # timed p2p migrations at each domain count
    oneshot_reps: int
    floor_n: int  # calls per shape of the stack's floor


FULL = Sizes(200, 20, 1000, 1000, 5, 5, 512, 5, 10000, 100, 15, 1000)
QUICK = Sizes(30, 5, 150, 60, 2, 1, 256, 2, 2000, 30, 5, 200)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    tool: str  # "vmmigrate" or "libvirt"
    keys: tuple[str, ...]  # the metrics it measures (null with its reason if it fails)
    run: Callable[[Run], None]


class Run:
    """One bench/run: its sizes, its working directory, the metrics so far."""

    def __init__(self, sizes: Sizes, work: Path, lab: LabRunner | None) -> None:
        self.sizes = sizes
        self.work = work
        self.lab = lab
        self.metrics: dict[str, float | None] = {k: None for s in STEPS for k in s.keys}
        self.metrics["scale_domains"] = float(sizes.scale_domains)
        self.why_null: dict[str, str] = {}
        self.data: dict[str, Any] = {}  # raw figures, for the plots and --json
        self.failed: dict[str, str] = {}

    @property
    def libvirt(self) -> LabRunner:
        assert self.lab is not None
        return self.lab

    def set(self, key: str, value: float | None, why: str = "") -> None:
        assert key in self.metrics, key
        self.metrics[key] = None if value is None else round(float(value), 3)
        if value is None:
            self.why_null[key] = why or "not measured"

    def quiet(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a benchmark's function with its printout going to ``name``.log."""
        with (self.work / f"{name}.log").open("a") as fh, contextlib.redirect_stdout(fh):
            return fn(*args)

    def step(self, step: Step, index: int, total: int, skip: str = "") -> None:
        print(f"[{index}/{total}] {step.name} ({step.tool})", end="", flush=True)
        if skip:
            print(f": skipped, {skip}", flush=True)
            for k in step.keys:
                self.set(k, None, skip)
            return
        t0 = time.monotonic()
        try:
            step.run(self)
        except Exception as exc:  # a failed step: its figures are null, the run goes on
            why = f"{step.name} failed: {type(exc).__name__}: {exc}"[:400]
            self.failed[step.name] = why
            with (self.work / f"{step.name}.log").open("a") as fh:
                traceback.print_exc(file=fh)
            for k in step.keys:
                if self.metrics[k] is None:
                    self.set(k, None, why)
            print(f": FAILED after {time.monotonic() - t0:.0f} s: {why}", flush=True)
            return
        print(f": {time.monotonic() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------
# helpers


def a_to_b_rates(rows: Sequence[dict[str, Any]], level: str, ok: Callable[[dict[str, Any]], bool],
                 direction: str = "A->B") -> dict[str, float]:  # fmt: skip
    """migrations/s by concurrency level of the runs in ``direction`` that moved everything."""
    return {
        str(r[level]): float(r["migr_per_s"])
        for r in rows
        if r.get("direction", "A->B") == direction and ok(r)
    }


def best(run: Run, key: str, rates: dict[str, float], why: str) -> None:
    run.set(key, max(rates.values()) if rates else None, "" if rates else why)


def med(summary: dict[str, Any], key: str) -> float | None:
    """The median of one column of bench_live's summary (None without a sample)."""
    col = summary.get(key, {})
    return float(col["median"]) if col.get("n") else None


def pct50(xs: Sequence[float]) -> float | None:
    return bench_offline.pct(xs, 50) if xs else None


def read_json(path: Path) -> Any:
    if not path.exists():
        raise RuntimeError(f"the benchmark wrote no results ({path.name})")
    return json.loads(path.read_text())


@contextlib.contextmanager
def host_pair(work: Path) -> Iterator[tuple[Host, Host]]:
    """Two fresh hosts (srcd + dstd each) on bench_live's loopback addresses."""
    hosts: list[Host] = []
    try:
        for name, ip in (("A", bench_live.IP_A), ("B", bench_live.IP_B)):
            h = Host(name, ip, work / name)
            hosts.append(h)
            h.start()
        yield hosts[0], hosts[1]
    finally:
        for h in hosts:  # Daemon.stop() signals its own Popen (by pid), nothing broader
            h.stop()


# ---------------------------------------------------------------------------------------
# the steps: vmmigrate


def offline(run: Run) -> None:
    s = run.sizes
    out = run.work / "offline.json"
    rc = run.quiet("offline", bench_offline.main, [
        "--n", str(s.offline_n), "--warmup", str(s.offline_warmup),
        "--domains", str(s.evac_domains), "--clients", LEVELS, "--idle-s", "1",
        "--json", str(out),
    ])  # fmt: skip
    r = read_json(out)
    lat = r["latency"]
    run.data["offline"] = {"p2p": lat["p2p"]["samples_ms"], "managed": lat["managed"]["samples_ms"]}
    run.set("offline_p2p_p50_ms", lat["p2p"]["p50"])
    run.set("offline_managed_p50_ms", lat["managed"]["p50"])
    def moved(path: str) -> Callable[[dict[str, Any]], bool]:
        # runs from before MigrateMany have no path: they were one Migrate per domain
        return lambda x: x.get("path", "unary") == path and x["verify"]["ok"] and not x["errors"]

    runs = r["throughput"]["runs"]
    # the target row: the path migctl evacuate takes (one MigrateMany per evacuation)
    rates = a_to_b_rates(runs, "clients", moved("many"))
    run.data["evac"] = rates
    run.data["evac_unary"] = a_to_b_rates(runs, "clients", moved("unary"))
    run.data["evac_domains"] = s.evac_domains
    best(run, "evac_best_per_s", rates, f"no evacuation run moved every domain (exit {rc})")
    best(run, "evac_unary_best_per_s", run.data["evac_unary"],
         f"no per-domain Migrate evacuation moved every domain (exit {rc})")  # fmt: skip


def floor(run: Run) -> None:
    """The offline call shapes with no work in them (bench_grpc_floor, with the flushes):
    what Python on grpc.aio costs before any of our code runs."""
    for shape, key in (("p2p", "floor_p2p_p50_ms"), ("client", "floor_managed_p50_ms")):
        out = run.work / f"floor-{shape}.json"
        argv = ["--n", str(run.sizes.floor_n), "--shape", shape, "--fsync", "--json", str(out)]
        rc = run.quiet(f"floor-{shape}", bench_grpc_floor.main, argv)
        if rc != 0:
            raise RuntimeError(f"bench_grpc_floor --shape {shape} exited {rc}")
        run.set(key, read_json(out)["p50_ms"])


def evacuate(run: Run) -> None:
    out = run.work / "evacuate.json"
    rc = run.quiet("evacuate", bench_evacuate.main, [
        "--domains", str(run.sizes.evacuate_domains), "--parallel-levels", LEVELS,
        "--json", str(out),
    ])  # fmt: skip
    rates = a_to_b_rates(
        read_json(out)["runs"], "parallel", lambda x: x["summary_ok"] and x["verify"]["ok"]
    )
    run.data["evacuate"] = rates
    best(run, "evac_migctl_best_per_s", rates, f"no migctl evacuate run moved everything (exit {rc})")


def migctl_startup_ms(reps: int) -> float:
    """``migctl --version``: the interpreter and every import migctl makes, no RPC."""
    walls = []
    for _ in range(reps):
        walls.append(bench_live.migctl(f"{bench_live.IP_A}:1", "--version", timeout=60)[0] * 1e3)
    return statistics.median(walls)


def live_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"wall_ms": r["wall_ms"], "pause_ms": r.get("guest_pause_ms")}
        for r in rows
        if not r.get("error")
    ]


def dst_qemu_startup_ms(raw: dict[str, list[dict[str, Any]]]) -> float | None:
    """The median start-up of every bare destination QEMU of the raw baselines (``raw`` and
    ``raw_chain``: the command line the daemons build, the loader included), so that one
    slow start on a busy machine does not make the figure."""
    xs = [float(x["dst_qemu_startup_ms"]) for rows in raw.values() for x in rows
          if x.get("dst_qemu_startup_ms") is not None]  # fmt: skip
    return statistics.median(xs) if xs else None


def live(run: Run) -> None:
    out = run.work / "live.json"
    run.quiet("live", bench_live.main, ["--n", str(run.sizes.live_n), "--json", str(out)])
    r = read_json(out)
    s = r["summary"]
    dm, tm = s["direct_migctl"], s["tunnelled_migctl"]
    why = "; ".join(dm.get("errors", [])) or "no successful migration"
    run.data["live"] = {
        "direct": live_rows(r["vmmigrate"].get("direct_migctl", [])),
        "tunnelled": live_rows(r["vmmigrate"].get("tunnelled_migctl", [])),
    }
    run.data["live_guest"] = (
        f"{r['config']['mem_mib']} MiB guest, {r['config']['fill_mib']} MiB random RAM"
    )
    run.set("live_wall_ms", med(dm, "wall_ms"), why)
    run.set("live_downtime_ms", med(dm, "guest_pause_ms"), why)
    run.set("live_qemu_downtime_ms", med(dm, "downtime_ms"), why)
    run.set("live_pause_extra_direct_ms", med(dm, "pause_minus_downtime_ms"), why)
    run.set("live_pause_extra_tunnelled_ms", med(tm, "pause_minus_downtime_ms"),
            "; ".join(tm.get("errors", [])) or "no successful tunnelled migration")  # fmt: skip
    th = s["targets"]["throughput"]
    run.set("direct_mb_s", th["direct_MBps"] or None, why)
    run.set("tunnelled_mb_s", th["tunnelled_MBps"] or None, "no successful tunnelled migration")
    startup = migctl_startup_ms(run.sizes.oneshot_reps)
    over = med(dm, "overhead_ms")
    run.set("live_wall_minus_qemu_ms", over, why)
    own = med(dm, "overhead_minus_dst_startup_ms")
    if own is not None:
        # the destination QEMU's start-up as it happened in each migration (dstd's
        # emulator_started): only migctl's start-up is measured apart
        qemu = med(dm, "dst_emulator_startup_ms")
        run.data["live_startup_source"] = "in-run"
        left: float | None = own - startup
    else:  # a dstd that does not log it: the raw baselines' bare QEMUs
        qemu = dst_qemu_startup_ms(r["raw"])
        run.data["live_startup_source"] = "raw"
        left = None if over is None or qemu is None else over - qemu - startup
    run.set("migctl_startup_ms", startup)
    run.set("live_dst_qemu_startup_ms", qemu, "no raw baseline")
    if left is not None and left < 0:
        # the baselines are measured apart from the migrations (bare QEMUs, `migctl
        # --version`): on a loaded machine they can take longer than the same steps took
        # inside the run, and a negative remainder says nothing about our own time
        run.set("live_overhead_ms", None,
                f"not measurable in this run: wall - QEMU time left {over:.0f} ms, less than the "
                f"start-ups measured apart ({qemu:.0f} + {startup:.0f} ms)")  # fmt: skip
    else:
        run.set("live_overhead_ms", left, why if over is None else "no raw baseline")


def live_cap(run: Run) -> None:
    out = run.work / "live_cap.json"
    run.quiet("live_cap", bench_live.main, [
        "--n", str(run.sizes.live_cap_n), "--bandwidth-mib", str(LIVE_CAP_MIB),
        "--json", str(out),
    ])  # fmt: skip
    th = read_json(out)["summary"]["targets"]["throughput"]
    run.set("cap400_direct_mb_s", th["direct_MBps"] or None, "no successful direct migration")
    run.set("cap400_tunnelled_mb_s", th["tunnelled_MBps"] or None, "no successful tunnelled one")
    run.set("cap400_tunnel_ratio", th["tunnelled_ratio"] or None, "a mode had no success")


def tunnel(run: Run) -> None:
    ns = argparse.Namespace(
        mib=run.sizes.tunnel_mib, reps=run.sizes.tunnel_reps, modes=["plain"], encodings=["raw"]
    )
    r = run.quiet("tunnel", asyncio.run, bench_tunnel.measure(ns))
    run.set("tunnel_stream_mb_s", r["median"]["plain"]["raw"]["MBps"])


def restart_ms(host: Host) -> float:
    """Stop each daemon of ``host``, start it again on its address, and time the start:
    spawn -> its ``daemon_ready`` log line. The slower of the two, ms."""
    times = []
    for old, start in ((host.srcd, host.start_srcd), (host.dstd, host.start_dstd)):
        assert old is not None
        old.stop()
        t0 = time.time()
        new: Daemon = start()
        ready = [e for e in new.events() if e.get("event") == "daemon_ready"][-1]
        times.append((bench_live.iso_to_unix(str(ready["timestamp"])) - t0) * 1e3)
    return max(times)


def daemon_pids(*hosts: Host) -> list[int]:
    return [d.proc.pid for h in hosts for d in (h.srcd, h.dstd) if d is not None]


async def p2p_p50(a: Host, b: Host, domains: list[str], n: int, warmup: int) -> float:
    """Define ``domains`` on A (inactive), then one more domain's p2p p50 over ``n``
    migrations A -> B -> A ... after ``warmup``."""
    client = bench_offline.Client(a, b)
    try:
        await client.ready()
        await bench_evacuate.define_all(client, domains)
        name = f"probe-{len(domains)}"
        await client.define("A", sample_domain_xml(name))
        times = await bench_offline.ping_pong(
            client, name, bench_offline.p2p_step(client, name), warmup, n
        )
    finally:
        await client.close()
    return bench_offline.pct(times, 50)


def scale(run: Run) -> None:
    s = run.sizes
    names = [f"scale-{i:05d}" for i in range(s.scale_domains)]
    with host_pair(run.work / "scale") as (a, b):
        time.sleep(IDLE_S)
        rss = [rss_mb(p) for p in daemon_pids(a, b)]
        run.set("idle_rss_mb", max((x for x in rss if x is not None), default=None))
        small = asyncio.run(p2p_p50(a, b, names[:SMALL], s.scale_n, s.offline_warmup))
        run.set("scale_p50_small_ms", small)
        walls = []
        for _ in range(s.oneshot_reps):
            wall, out = bench_live.migctl(a.src, "list", "--all", timeout=60)
            assert names[0] in out, out
            walls.append(wall * 1e3)
        run.set("migctl_oneshot_ms", statistics.median(walls))
        run.set("daemon_start_small_ms", restart_ms(a))
        large = asyncio.run(p2p_p50(a, b, names[SMALL:], s.scale_n, s.offline_warmup))
        run.set("scale_p50_large_ms", large)
        run.set("scale_latency_ratio", large / small)
        run.set("rss_large_mb", max((x for x in (rss_mb(p) for p in daemon_pids(a)) if x), default=None))
        run.set("daemon_start_large_ms", restart_ms(a))


# ---------------------------------------------------------------------------------------
# the steps: libvirt


def lv_offline(run: Run) -> None:
    # untimed first, as bench_offline warms up: a fresh libvirtd probes QEMU's capabilities
    # at its first domain operation (about 4 s)
    run.libvirt.latency(max(run.sizes.offline_warmup // 2, 1), "lv_warmup.log")
    res = run.libvirt.latency(max(run.sizes.offline_n // 2, 1))
    run.data["lv_offline"] = res
    run.set("libvirt_offline_p2p_p50_ms", pct50(res.get("p2p", [])), "no p2p sample")
    run.set("libvirt_offline_managed_p50_ms", pct50(res.get("direct", [])), "no sample")


def lv_evac(run: Run) -> None:
    rows = run.libvirt.evac(run.sizes.evac_domains, LEVELS)
    rates = a_to_b_rates(rows, "threads", lambda x: x["verify"]["ok"] and not x["errors"])
    run.data["lv_evac"] = rates
    best(run, "libvirt_evac_best_per_s", rates, "no libvirt run moved every domain")


def lv_rows_ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of lv_live_bench whose guest runs on the destination with its RAM intact."""
    return [r for r in rows if r.get("ram_words_ok") == 8 and (r.get("dst_state") or [0])[0] == 1]


def lv_live_mode(run: Run, tunnelled: bool) -> list[dict[str, Any]]:
    rows = lv_rows_ok(run.libvirt.live(run.sizes.live_n, tunnelled))
    if not rows:
        raise RuntimeError("no libvirt migration ended with the guest intact on the destination")
    mode = "tunnelled" if tunnelled else "native"
    run.data.setdefault("lv_live", {})[mode] = [
        {"wall_ms": r["virsh_wall_s"] * 1e3, "pause_ms": r.get("ev_downtime_ms")} for r in rows
    ]
    mbps = [r["ev_memory_bps"] / 1e6 for r in rows if r.get("ev_memory_bps")]
    run.set(f"libvirt_{'tunnelled' if tunnelled else 'direct'}_mb_s", median_or_none(mbps),
            "libvirt reported no memory_bps")  # fmt: skip
    return rows


def lv_live(run: Run) -> None:
    rows = lv_live_mode(run, False)
    run.set("libvirt_live_wall_ms", statistics.median(r["virsh_wall_s"] * 1e3 for r in rows))
    downs = [float(r["ev_downtime_ms"]) for r in rows if r.get("ev_downtime_ms") is not None]
    run.set("libvirt_live_downtime_ms", median_or_none(downs), "libvirt reported no downtime")


def lv_live_tunnel(run: Run) -> None:
    lv_live_mode(run, True)


def lv_oneshot(run: Run) -> None:
    run.set("virsh_list_oneshot_ms", statistics.median(run.libvirt.virsh_list(run.sizes.oneshot_reps)))
    run.set("libvirtd_rss_mb", run.libvirt.libvirtd_rss_mb(), "libvirtd is gone")


STEPS = (
    Step("offline", "vmmigrate",
         ("offline_p2p_p50_ms", "offline_managed_p50_ms", "evac_best_per_s",
          "evac_unary_best_per_s"), offline),
    Step("lv_offline", "libvirt",
         ("libvirt_offline_p2p_p50_ms", "libvirt_offline_managed_p50_ms"), lv_offline),
    Step("floor", "vmmigrate", ("floor_p2p_p50_ms", "floor_managed_p50_ms"), floor),
    Step("lv_evac", "libvirt", ("libvirt_evac_best_per_s",), lv_evac),
    Step("evacuate", "vmmigrate", ("evac_migctl_best_per_s",), evacuate),
    Step("live", "vmmigrate",
         ("live_wall_ms", "live_downtime_ms", "live_qemu_downtime_ms", "live_overhead_ms",
          "live_wall_minus_qemu_ms",
          "live_pause_extra_direct_ms", "live_pause_extra_tunnelled_ms", "direct_mb_s",
          "tunnelled_mb_s", "migctl_startup_ms", "live_dst_qemu_startup_ms"), live),
    Step("lv_live", "libvirt",
         ("libvirt_live_wall_ms", "libvirt_live_downtime_ms", "libvirt_direct_mb_s"), lv_live),
    Step("lv_live_tunnel", "libvirt", ("libvirt_tunnelled_mb_s",), lv_live_tunnel),
    Step("live_cap", "vmmigrate",
         ("cap400_direct_mb_s", "cap400_tunnelled_mb_s", "cap400_tunnel_ratio"), live_cap),
    Step("tunnel", "vmmigrate", ("tunnel_stream_mb_s",), tunnel),
    Step("scale", "vmmigrate",
         ("idle_rss_mb", "scale_p50_small_ms", "scale_p50_large_ms", "scale_latency_ratio",
          "daemon_start_small_ms", "daemon_start_large_ms", "rss_large_mb",
          "migctl_oneshot_ms"), scale),
    Step("lv_oneshot", "libvirt", ("virsh_list_oneshot_ms", "libvirtd_rss_mb"), lv_oneshot),
)  # fmt: skip
STEP_NAMES = tuple(s.name for s in STEPS)


# ---------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run", description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="steps: " + ", ".join(STEP_NAMES),
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions and smaller counts: under five minutes")  # fmt: skip
    ap.add_argument("--no-libvirt", action="store_true", help="measure vmmigrate only")
    ap.add_argument("--libvirt-lab", metavar="DIR", help=f"the libvirt lab (default {DEFAULT_LAB})")
    ap.add_argument("--lab-state", default=os.environ.get("LAB", "/tmp/libvirt-lab"),
                    help="the lab's state directory ($LAB, default /tmp/libvirt-lab)")  # fmt: skip
    ap.add_argument("--only", metavar="STEP,...",
                    help="run these steps only (implies --no-docs)")  # fmt: skip
    ap.add_argument("--no-docs", action="store_true",
                    help="leave docs/PERFORMANCE.md and the plots alone")  # fmt: skip
    ap.add_argument("--workdir", help="keep logs and results here (default: a temp dir)")
    ap.add_argument("--json", metavar="PATH", help="also write every result (and samples) here")
    args = ap.parse_args(argv)
    args.steps = list(STEP_NAMES)
    if args.only:
        args.steps = [s for s in args.only.split(",") if s]
        unknown = sorted(set(args.steps) - set(STEP_NAMES))
        if unknown or not args.steps:
            ap.error(f"--only: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_NAMES)}")
        args.no_docs = True
    for opt in ("workdir", "json", "libvirt_lab", "lab_state"):
        if getattr(args, opt):
            setattr(args, opt, str(Path(getattr(args, opt)).resolve()))
    return args


def machine(load_start: float) -> dict[str, Any]:
    m = bench_live.machine_info()
    return {
        "nproc": m["nproc"],
        "cpu_model": m["cpu_model"],
        "kernel": m["kernel"],
        "qemu": m["qemu"],
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


def sizes_text(s: Sizes, quick: bool) -> str:
    text = (
        f"offline latency {s.offline_n} timed migrations per mode after {s.offline_warmup} "
        f"(libvirt {max(s.offline_n // 2, 1) * 2}); evacuation {s.evac_domains} domains; "
        f"migctl evacuate {s.evacuate_domains}; live {s.live_n} per variant ({s.live_cap_n} "
        f"at the cap); tunnel "
        f"{s.tunnel_reps} x {s.tunnel_mib} MiB; scale {SMALL} and {s.scale_domains} domains, "
        f"{s.scale_n} migrations each; one-shots {s.oneshot_reps}"
    )
    return f"{text} (--quick: smaller than the full run's)" if quick else text


def notes(run: Run) -> list[str]:
    m = run.metrics
    out = [
        "live figures are medians of `migctl migrate --live --p2p --persistent` against "
        "`virsh migrate --live --p2p --persistent --undefinesource`, bandwidth 10 GiB/s; "
        "vmmigrate's pause is QMP STOP on the source to RESUME on the destination, libvirt's "
        "is its own downtime statistic (CPUs stopped to resumed, libvirt's clock)",
        f"overhead = wall - QEMU total-time ({fmt_ms(m.get('live_wall_minus_qemu_ms'))}) after "
        f"subtracting the destination QEMU's start-up ({fmt_ms(m.get('live_dst_qemu_startup_ms'))}, "
        + ("each migration's own, from dstd's emulator_started (exec to monitor), median"
           if run.data.get("live_startup_source") == "in-run" else
           "the median of the raw baselines' bare QEMUs with the same command line")
        + ") and "
        f"migctl's start-up "
        f"({fmt_ms(m.get('migctl_startup_ms'))}, `migctl --version`)",
        "throughput: vmmigrate's is RAM transferred / QEMU's total-time; libvirt's is QEMU's "
        "own average (`memory_bps` of the completed job)",
        f"scale: p2p p50 {fmt_ms(m.get('scale_p50_small_ms'))} with {SMALL} domains, "
        f"{fmt_ms(m.get('scale_p50_large_ms'))} with {run.sizes.scale_domains}; daemon start "
        f"{fmt_ms(m.get('daemon_start_small_ms'))} / {fmt_ms(m.get('daemon_start_large_ms'))}; "
        f"RSS with {run.sizes.scale_domains} domains {report.fmt(m.get('rss_large_mb'))} MB",
    ]
    out += [f"null: `{k}`: {why}" for k, why in run.why_null.items()]
    return out


def fmt_ms(x: float | None) -> str:
    return "null" if x is None else f"{report.fmt(x)} ms"


def measure(args: argparse.Namespace, work: Path) -> tuple[Run, str]:
    """Every selected step, libvirt's through the lab (brought down at the end only when
    this run brought it up); the run and what became of libvirt."""
    lab, brought_up, why = open_lab(args, work)
    status = "measured in the same run, through the libvirt lab" if lab else f"not measured: {why}"
    run = Run(QUICK if args.quick else FULL, work, LabRunner(lab, work) if lab else None)
    try:
        chosen = [s for s in STEPS if s.name in args.steps]
        for step in STEPS:
            if step not in chosen:
                for k in step.keys:
                    run.set(k, None, "step not run (--only)")
        for i, step in enumerate(chosen, 1):
            skip = f"libvirt not measured: {why}" if step.tool == "libvirt" and not lab else ""
            run.step(step, i, len(chosen), skip)
    finally:
        if lab is not None and brought_up:
            print("bringing the libvirt lab down", flush=True)
            lab.script("down", work / "lab.log")
    return run, status


def publish(run: Run, info: dict[str, Any]) -> None:
    """The plots into docs/ and the section of docs/PERFORMANCE.md."""
    plots, info["plots_why"] = report.draw(run.data, DOC.parent)
    report.rewrite_doc(DOC, report.section(info, run.metrics, plots, notes(run)))
    print(f"wrote {DOC.relative_to(ROOT)} (section 'Figures (bench/run)') and "
          f"{', '.join(plots) or 'no plots: ' + info['plots_why']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    os.chdir(ROOT)  # paths in the arguments are absolute by now
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-run-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start, started = os.getloadavg()[0], time.monotonic()
    mode = "quick: smaller counts and fewer repetitions" if args.quick else "full"
    print(f"bench/run ({mode}); logs in {work}", flush=True)
    run, status = measure(args, work)
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(load_start),
        "libvirt_version": libvirt_version(),
        "command": " ".join(["bench/run", *(sys.argv[1:] if argv is None else argv)]),
        "mode": mode,
        "runtime_s": time.monotonic() - started,
        "libvirt": status,
        "sizes": sizes_text(run.sizes, args.quick),
    }
    print(f"\n{report.text_table(run.metrics)}\n")
    for line in notes(run):
        print(f"  {line}")
    if not args.no_docs:
        publish(run, info)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "metrics": run.metrics,
                                               "why_null": run.why_null, "data": run.data}, indent=1))  # fmt: skip
    if args.workdir is None and not run.failed:
        shutil.rmtree(work, ignore_errors=True)
    elif run.failed:
        print(f"logs of the failed step(s) kept in {work}")
    print(f"runtime {info['runtime_s']:.0f} s ({mode})", flush=True)
    print(json.dumps({**run.metrics, "quick": args.quick, "libvirt": status,
                      "targets_met": report.targets_met(run.metrics), "why_null": run.why_null}))  # fmt: skip
    return 0
