"""A bounded soak: migrations back and forth between two hosts whose four daemons have every
failpoint armed at random (crash, error or delay, each firing on a small share of hits).

Rounds of concurrent migrations (offline and live, p2p and client-driven, through migctl);
after each round, dead daemons are restarted (on the same address, with a new random seed)
until every journal is empty, then the invariant is checked for every domain: defined on
exactly one host, byte for byte as first defined; a live domain's emulator alive on exactly
that host, and running. Used by tests/integration/test_soak.py (small) and scripts/soak.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmmigrate.common.failpoints import DSTD_FAILPOINTS, SRCD_FAILPOINTS

from .hosts import Host, sample_domain_xml
from .live import alive
from .qmp import qmp_for, runtime_record

ACTIONS = ("crash", "error", "delay(30)")


@dataclasses.dataclass
class SoakCounts:
    attempted: int = 0
    succeeded: int = 0
    failed_cleanly: int = 0
    crashes: int = 0  # daemon processes that died (crash failpoints)
    faults_injected: int = 0  # failpoint hits that fired (any action)
    invariant_violations: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    tunnelled: int = 0  # live p2p migrations sent --tunnelled

    def summary(self) -> str:
        return (
            f"migrations attempted {self.attempted} ({self.tunnelled} tunnelled), "
            f"succeeded {self.succeeded}, "
            f"failed cleanly {self.failed_cleanly}, faults injected {self.faults_injected} "
            f"(daemon crashes {self.crashes}), invariant violations "
            f"{self.invariant_violations}, in {self.seconds:.0f} s"
        )


@dataclasses.dataclass
class Domain:
    name: str
    uuid: str
    xml: bytes  # the stored definition, as first defined
    live: bool


def _spec(names: tuple[str, ...], rng: random.Random, percent: float) -> str:
    return ";".join(f"{n}={rng.choice(ACTIONS)}@{percent}" for n in names)


class Soak:
    def __init__(self, workdir: Path, *, percent: float, seed: int,
                 log: Callable[[str], None] = print) -> None:
        self.rng = random.Random(seed)
        self.percent = percent
        self.log = log
        self.a = Host("A", "127.0.0.2", workdir / "A")
        self.b = Host("B", "127.0.0.3", workdir / "B")
        self.counts = SoakCounts()
        self.domains: list[Domain] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    # ------------------------------------------------------------------ daemons

    def _env(self, which: str) -> dict[str, str]:
        names = SRCD_FAILPOINTS if which == "srcd" else DSTD_FAILPOINTS
        return {
            "VMMIGRATE_FAILPOINTS": _spec(names, self.rng, self.percent),
            "VMMIGRATE_FAILPOINT_SEED": str(self.rng.getrandbits(32)),
        }

    def _start(self, h: Host, which: str) -> None:
        if which == "srcd":
            h.start_srcd(["--rpc-timeout", "5"], env=self._env("srcd"))
        else:
            h.start_dstd(["--rpc-timeout", "5"], env=self._env("dstd"))

    def start(self, n_offline: int, n_live: int) -> None:
        for h in (self.a, self.b):
            for which in ("srcd", "dstd"):
                self._start(h, which)
        for i in range(n_offline + n_live):
            live = i >= n_offline
            name = f"soak-{'live' if live else 'off'}-{i}"
            u = str(uuidlib.uuid4())
            path = self.a.workdir / f"{name}.xml"
            path.write_text(sample_domain_xml(name, u, memory_mib=16))
            self._migctl(self.a, "define", str(path))
            xml = (self.a.state_dir / "domains" / f"{u}.xml").read_bytes()
            if live:
                self._migctl(self.a, "start", name)
            self.domains.append(Domain(name, u, xml, live))
        self._watcher.start()

    def _migctl(self, h: Host, *args: str) -> None:
        """A setup command: retried while a daemon is down (faults are armed already)."""
        for _ in range(50):
            self.revive()
            if h.migctl(*args, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"migctl {args} kept failing")

    def _watch(self) -> None:
        """Restart daemons as soon as they die, as a service manager would."""
        while not self._stopping.wait(0.05):
            self.revive()

    def revive(self) -> int:
        """Restart dead daemons; returns how many."""
        with self._lock:
            return self._revive()

    def _revive(self) -> int:
        n = 0
        for h in (self.a, self.b):
            for which, d in (("srcd", h.srcd), ("dstd", h.dstd)):
                if d is not None and d.proc.poll() is not None:
                    self.counts.crashes += 1
                    n += 1
                    try:
                        self._start(h, which)
                    except RuntimeError as exc:
                        # it crashed again while recovering (a failpoint fired during
                        # start-up): the next round of revive starts it once more
                        self.log(f"{h.name} {which} died starting: {str(exc)[:200]}")
        return n

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()
        self.a.stop()
        self.b.stop()
        # Host.stop kills the emulators the runtime records name: any left now was lost
        # track of (an invariant violation), and is killed here
        for pid in _emulators_of({d.uuid for d in self.domains}):
            self.counts.invariant_violations += 1
            self.counts.violations.append(f"emulator pid {pid} left running, untracked")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ checks

    def owner(self, d: Domain) -> list[Host]:
        return [h for h in (self.a, self.b) if (h.state_dir / "domains" / f"{d.uuid}.xml").exists()]

    def settle(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while True:
            self.revive()
            if all(h.journal() == [] for h in (self.a, self.b)):
                return
            if time.monotonic() > end:
                left = []
                for h in (self.a, self.b):
                    for path in h.journal():
                        try:
                            rec = json.loads(path.read_text())
                        except (OSError, ValueError):
                            rec = {}
                        left.append(f"{h.name}: {path.name} role={rec.get('role')} "
                                    f"phase={rec.get('phase')} domain={rec.get('domain_name')}")
                raise AssertionError(f"journals not empty after recovery: {left}")
            time.sleep(0.05)

    def check(self, d: Domain) -> Host | None:
        where = self.owner(d)
        problem = ""
        if len(where) != 1:
            problem = f"defined on {[h.name for h in where]}"
        elif (where[0].state_dir / "domains" / f"{d.uuid}.xml").read_bytes() != d.xml:
            problem = f"definition on {where[0].name} differs"
        elif d.live:
            running = [h for h in (self.a, self.b) if _emulator_alive(h, d.uuid)]
            if [h.name for h in running] != [where[0].name]:
                problem = f"defined on {where[0].name}, emulator alive on {[h.name for h in running]}"
            else:
                deadline = time.monotonic() + 20
                status = _status(where[0], d.uuid)
                while status != "running" and time.monotonic() < deadline:
                    time.sleep(0.1)
                    status = _status(where[0], d.uuid)
                if status != "running":
                    problem = f"left {status} on {where[0].name}"
        if problem:
            self.counts.invariant_violations += 1
            self.counts.violations.append(f"{d.name}: {problem}")
            self.log(f"INVARIANT VIOLATION {d.name}: {problem}")
            return None
        return where[0]

    # ------------------------------------------------------------------ migrations

    def migrate(self, d: Domain, src: Host, dst: Host, p2p: bool, tunnelled: bool) -> bool:
        args = ["migrate", "--persistent", "--undefinesource",
                "--live" if d.live else "--offline"]
        if p2p:
            args.append("--p2p")
        if p2p and d.live and tunnelled:
            args.append("--tunnelled")
        cmd = [sys.executable, "-m", "vmmigrate.migctl", "-c", src.src, *args, d.name, dst.dst]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        if "Traceback" in r.stderr:
            self.counts.invariant_violations += 1
            self.counts.violations.append(f"{d.name}: migctl traceback {r.stderr[-500:]}")
        return r.returncode == 0

    def run(self, migrations: int, workers: int) -> SoakCounts:
        started = time.monotonic()
        owners = {d.name: self.a for d in self.domains}
        while self.counts.attempted < migrations:
            batch = self.rng.sample(self.domains, min(workers, len(self.domains),
                                                      migrations - self.counts.attempted))
            plan = []
            for d in batch:
                src = owners[d.name]
                plan.append((d, src, self.b if src is self.a else self.a,
                             self.rng.random() < 0.5, self.rng.random() < 0.5))
            self.counts.tunnelled += sum(1 for d, _, _, p2p, t in plan if p2p and d.live and t)
            with ThreadPoolExecutor(len(plan)) as pool:
                oks = list(pool.map(lambda p: self.migrate(*p), plan))
            self.counts.attempted += len(plan)
            self.settle()
            for (d, src, dst, _, _), ok in zip(plan, oks, strict=True):
                where = self.check(d)
                if where is None:
                    where = (self.owner(d) or [src])[0]
                elif ok and where is dst:
                    self.counts.succeeded += 1
                elif ok:
                    self.counts.invariant_violations += 1
                    self.counts.violations.append(f"{d.name}: migctl succeeded, still on source")
                else:
                    self.counts.failed_cleanly += 1
                owners[d.name] = where
            if self.counts.attempted % 100 < len(plan):
                self.log(self.counts.summary())
        self.counts.seconds = time.monotonic() - started
        self.counts.faults_injected = sum(_fault_events(h) for h in (self.a, self.b))
        return self.counts


def _emulators_of(uuids: set[str]) -> list[int]:
    """Pids of live emulator processes whose command line names one of ``uuids``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        named = args[args.index("-uuid") + 1] if "-uuid" in args[:-1] else ""
        if named in uuids and alive(int(entry)):
            found.append(int(entry))
    return found


def _emulator_alive(h: Host, uuid: str) -> bool:
    rec = runtime_record(h.state_dir, uuid)
    return rec is not None and alive(int(rec["pid"]))


def _status(h: Host, uuid: str) -> str:
    try:
        with qmp_for(h.state_dir, uuid) as q:
            return str(q.cmd("query-status")["status"])
    except (OSError, RuntimeError, KeyError) as exc:
        return f"unreachable ({exc})"


def _fault_events(h: Host) -> int:
    n = 0
    for which in ("srcd", "dstd"):
        path = h.workdir / f"{which}.log"
        if path.exists():
            n += path.read_text(errors="replace").count('"event": "failpoint_hit"')
    return n


def soak(workdir: Path, *, migrations: int, workers: int = 4, n_offline: int = 12,
         n_live: int = 4, percent: float = 2.0, seed: int = 1,
         log: Callable[[str], None] = print) -> SoakCounts:
    s = Soak(workdir, percent=percent, seed=seed, log=log)
    try:
        s.start(n_offline, n_live)
        s.run(migrations, workers)
    finally:
        s.stop()
    return s.counts
