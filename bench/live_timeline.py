#!/usr/bin/env python3
"""Where one live migration's time goes: every daemon log event (debug level) and the
emulators' own QMP events (STOP and MIGRATION completed on the source, MIGRATION completed
and RESUME on the destination), in ms after the client started it.

    .venv/bin/python -m bench.live_timeline [--n 2] [--tunnelled] [--client rpc|migctl]

The guest is bench_live's (512 MiB, 400 MiB random RAM), migrated A -> B -> A ... by the
p2p Migrate RPC (or migctl); each migration prints its figures (bench_live's row) and the
merged timeline. A diagnostic, not a benchmark: debug logging costs a little. Every process
it starts is stopped (by pid) before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from bench import bench_live as bl
from tests.helpers.hosts import Host

SKIP = ("timestamp", "event", "level", "logger", "role", "rpc", "migration_id", "domain", "uuid")


class EventWatch(bl.PauseWatch):
    """bench_live's pause watch, keeping every STOP / MIGRATION / RESUME it sees."""

    def __init__(self, *args: Any) -> None:
        self.seen: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        super().__init__(*args)

    def _note(self, side: str, e: dict[str, Any]) -> None:
        status = e.get("data", {}).get("status", "")
        if e["event"] == "MIGRATION" and status != "completed":
            return
        with self.lock:
            self.seen.append((bl.event_unix(e), f"{side}.{e['event']}"))

    def _watch_src(self) -> None:
        try:
            while True:
                e = self.src.wait_event(lambda e: e.get("event") in ("STOP", "MIGRATION"))
                self.src.events.remove(e)
                self._note("src", e)
                if e["event"] == "STOP":
                    self.stop_ts = bl.event_unix(e)
                if bl.migration_ended(e):
                    return
        except (OSError, EOFError, ValueError):
            pass
        finally:
            self.src.close()

    def _watch_dst(self) -> None:
        try:
            rec = None
            while rec is None:
                if self._halt.is_set():
                    return
                time.sleep(0.002)
                rec = self._new_dst_record()
            self.dst = bl.QMP(rec["qmp"])
            while True:
                e = self.dst.wait_event(lambda e: e.get("event") in ("RESUME", "MIGRATION"))
                self.dst.events.remove(e)
                self._note("dst", e)
                if e["event"] == "RESUME":
                    self.resume_ts = bl.event_unix(e)
                    return
        except (OSError, EOFError, ValueError):
            pass
        finally:
            if self.dst is not None:
                self.dst.close()


def merged(
    hosts: tuple[Host, Host], t0: float, until: float, qemu: list[tuple[float, str]]
) -> list[str]:
    rows: list[tuple[float, str]] = []
    for h in hosts:
        for kind, d in (("srcd", h.srcd), ("dstd", h.dstd)):
            assert d is not None
            for e in d.events():
                if "timestamp" not in e:
                    continue
                t = bl.iso_to_unix(str(e["timestamp"]))
                if t0 <= t <= until:
                    rest = {k: v for k, v in e.items() if k not in SKIP}
                    rows.append((t, f"{h.name}.{kind} {e.get('event')} {json.dumps(rest)[:160]}"))
    rows += [(t, f"qemu {name}") for t, name in qemu]
    return [f"  {(t - t0) * 1e3:8.1f}  {text}" for t, text in sorted(rows)]


async def run(a: Host, b: Host, args: argparse.Namespace, fill: Path, work: Path) -> None:
    name, uuid = "timeline", str(uuidlib.uuid4())
    xml = work / "timeline.xml"
    xml.write_text(bl.domain_xml(name, uuid, args.mem, fill))
    bl.migctl(a.src, "define", str(xml))
    bl.migctl(a.src, "start", name)
    bench = bl.Bench(a, b, name, uuid, args, fill)
    await bench.open()
    watches: list[EventWatch] = []
    bl.PauseWatch = lambda *w: watches.append(EventWatch(*w)) or watches[-1]  # type: ignore[misc,assignment]
    try:
        for _ in range(args.n):
            t0 = time.time()
            row = await bench.migrate_once(args.tunnelled, args.client)
            keys = (
                "wall_ms",
                "total_ms",
                "downtime_ms",
                "guest_pause_ms",
                "pause_minus_downtime_ms",
            )
            print(
                f"== {row['mode']} {row['client']} {row['direction']}: "
                + ", ".join(f"{k} {row.get(k)}" for k in keys)
            )
            seen = watches[-1].seen if watches else []
            print("\n".join(merged((a, b), t0, t0 + row["wall_ms"] / 1e3 + 0.05, seen)))
            await asyncio.sleep(args.settle)
    finally:
        await bench.close()
        bl.shutdown_domain(a, b, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2, help="migrations")
    ap.add_argument("--mem", type=int, default=512, help="guest RAM, MiB")
    ap.add_argument("--fill-mib", type=int, default=400, help="random data loaded into RAM")
    ap.add_argument("--bandwidth-mib", type=int, default=10240, help="max bandwidth, MiB/s")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds between migrations")
    ap.add_argument("--tunnelled", action="store_true")
    ap.add_argument("--client", choices=["rpc", "migctl"], default="rpc")
    args = ap.parse_args()
    args.strip_loader = False
    tmp = Path(tempfile.mkdtemp(prefix="live-timeline-"))
    a, b = Host("A", bl.IP_A, tmp / "A"), Host("B", bl.IP_B, tmp / "B")
    try:
        fill = tmp / "fill.bin"
        bl.make_fill(fill, args.fill_mib)
        opts = ["--allow-qemu-commandline", "--log-level", "debug"]
        a.start(opts, opts)
        b.start(opts, opts)
        asyncio.run(run(a, b, args, fill, tmp))
    finally:
        a.stop()
        b.stop()
        bl.kill_emulators([a, b])
        for p in list(bl.PROCS):
            bl.stop_proc(p)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
