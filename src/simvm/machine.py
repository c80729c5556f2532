"""The simulated guest: memory, a vCPU thread that dirties it, the dirty log, the run state.

Run states (QEMU's RunState words, as query-status reports them)::

    prelaunch --cont--> running <--cont/stop--> paused
        |                 |  ^
        |    switchover   |  | migration failed / cancelled (QEMU resumes the source)
        |                 v  |
        `-------------> finish-migrate --completed--> postmigrate --cont--> running
    inmigrate --memory arrived--> running (no -S) or paused (-S)
    any --quit / SIGTERM--> shutdown (the process exits)

:meth:`Machine.transition` is the one place the state changes: it refuses moves the table
does not allow, logs each move, and emits STOP when leaving ``running`` and RESUME when
entering it (QEMU's vm_stop / vm_start events; no STOP on shutdown, as QEMU).

Memory is a bytearray of 4 KiB pages. The vCPU writes only while the state is ``running``,
and only while holding the machine lock, so taking that lock freezes memory (used for
checksums and the switchover). While a migration runs, every page the vCPU writes is put
in the dirty set, which the migration swaps out at each pass (:meth:`sync_dirty`).

The vCPU's writes are deterministic given ``-seed``: the n-th write always hits the same
page with the same bytes, whatever the rate or throttle, so two simvms with one seed and
the same number of writes (:attr:`writes`) hold the same memory.

With disks (``-drive``), each vCPU tick also writes one record to every writable disk
(simvm/disk.py), under the lock and only while running; the disks' next sequence numbers
live in the last page of memory (the cursor page, which the random writes leave alone),
so they migrate with the memory. Leaving ``running`` fsyncs every disk.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import mmap
import random
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from vmmigrate.simvm.disk import Drive
from vmmigrate.simvm.stream import PAGE_SIZE

log = logging.getLogger("simvm.machine")

EmitFn = Callable[[str, dict[str, Any]], None]


class RunState(enum.Enum):
    PRELAUNCH = "prelaunch"  # started with -S, never ran; cont -> RUNNING
    RUNNING = "running"  # vCPU dirtying memory; stop -> PAUSED, switchover -> FINISH_MIGRATE
    PAUSED = "paused"  # stopped by `stop`, or -S after an incoming migration; cont -> RUNNING
    INMIGRATE = "inmigrate"  # -incoming: memory arriving; success -> RUNNING or PAUSED (-S)
    FINISH_MIGRATE = "finish-migrate"  # source stopped for the last pass -> POSTMIGRATE,
    # or back to RUNNING when the migration fails or is cancelled
    POSTMIGRATE = "postmigrate"  # source after a completed migration; cont -> RUNNING
    SHUTDOWN = "shutdown"  # quit or a signal: the process is exiting; final


_ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.PRELAUNCH: frozenset({RunState.RUNNING, RunState.FINISH_MIGRATE}),
    RunState.RUNNING: frozenset({RunState.PAUSED, RunState.FINISH_MIGRATE}),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.FINISH_MIGRATE}),
    RunState.INMIGRATE: frozenset({RunState.RUNNING, RunState.PAUSED}),
    RunState.FINISH_MIGRATE: frozenset({RunState.RUNNING, RunState.POSTMIGRATE}),
    RunState.POSTMIGRATE: frozenset({RunState.RUNNING}),
    RunState.SHUTDOWN: frozenset(),
}

# Linux 5.14's MADV_POPULATE_WRITE; Python 3.11's mmap module does not name it yet
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
VCPU_TICK = 0.01  # seconds between batches of dirty writes
WRITE_LEN = 16  # bytes of new random data per dirty write
_STAMP = struct.Struct("<Q")
CURSOR_MAGIC = b"SIMVMCUR"
_SEQ = struct.Struct("<Q")


class TransitionError(Exception):
    """A run-state change the table does not allow."""


class Machine:
    """Guest memory and the vCPU. Thread-safe; :attr:`lock` freezes memory while held."""

    def __init__(
        self,
        mib: int,
        *,
        emit: EmitFn,
        seed: int | None,
        dirty_rate: int,
        initial: RunState,
        fill: bool,
        drives: list[Drive] | None = None,
    ) -> None:
        self.page_size = PAGE_SIZE
        self.page_count = mib * (1 << 20) // PAGE_SIZE
        # anonymous mmap, not bytearray: its pages are zero until touched, so a destination
        # of any size starts at once (bytearray(n) would memset all of it)
        self.memory = mmap.mmap(-1, mib << 20)
        self.view = memoryview(self.memory)
        self.lock = threading.Lock()
        self.state = initial
        self.dirty_rate = dirty_rate  # pages/s while running
        self.throttle = 0  # % of the dirty rate held back (auto-converge)
        self.writes = 0  # dirty writes done so far
        self._emit = emit
        self._dirty: set[int] | None = None  # None: dirty logging off
        self._vcpu_rng = (
            random.Random(f"simvm-vcpu-{seed}") if seed is not None else random.Random()
        )
        self._wake = threading.Event()
        self._quit = False
        self._thread: threading.Thread | None = None
        self.drives = drives or []
        # the random writes stay off the cursor page (the last one) when there are disks
        self.guest_pages = self.page_count - (1 if self.drives else 0)
        self.cursor_page = self.page_count - 1
        if fill:
            _fill(self.memory, seed)
            if self.drives:
                self._init_cursor()

    # -- run state -------------------------------------------------------------------

    def transition(self, new: RunState) -> RunState:
        """Move to ``new`` (the one place the run state changes); returns the old state."""
        with self.lock:
            old = self.state
            if old is new or old is RunState.SHUTDOWN:
                return old  # nothing moves once the process is exiting
            if new is not RunState.SHUTDOWN and new not in _ALLOWED[old]:
                raise TransitionError(f"run state {old.value} -> {new.value} not allowed")
            self.state = new
            log.info("runstate %s -> %s", old.value, new.value)
            # emitted under the lock, so events leave in the order the state moved
            if old is RunState.RUNNING:
                self._flush_drives()  # QEMU flushes every drive when the VM stops
            if old is RunState.RUNNING and new is not RunState.SHUTDOWN:
                self._emit("STOP", {})
            if new is RunState.RUNNING:
                self._emit("RESUME", {})
        if new is RunState.RUNNING:
            self._wake.set()
        return old

    # -- memory ----------------------------------------------------------------------

    def prefault(self) -> None:
        """Fault the still-zero memory in, in the background: an incoming VM does it while
        it waits for the source, so the migration does not pay ~1 us per 4 KiB page in
        page faults (a third of the destination's work on a 512 MiB guest). Racing with
        arriving pages is harmless: populating a present page changes nothing."""
        threading.Thread(target=self._prefault, name="simvm-prefault", daemon=True).start()

    def _prefault(self) -> None:
        chunk = 8 << 20  # madvise holds the GIL: keep each call to a few milliseconds
        for off in range(0, len(self.memory), chunk):
            if self._quit:
                return
            try:
                self.memory.madvise(MADV_POPULATE_WRITE, off, min(chunk, len(self.memory) - off))
            except OSError:
                return  # a kernel before 5.14: pages fault in as they arrive instead

    # -- the vCPU --------------------------------------------------------------------

    def start_vcpu(self) -> None:
        self._thread = threading.Thread(target=self._vcpu, name="simvm-vcpu", daemon=True)
        self._thread.start()

    def stop_vcpu(self) -> None:
        self._quit = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.close_drives()

    def _vcpu(self) -> None:
        carry = 0.0
        last = time.monotonic()
        while not self._quit:
            idle = self.dirty_rate <= 0 and not self.drives
            if self.state is not RunState.RUNNING or idle:
                self._wake.clear()
                self._wake.wait(0.1)
                last = time.monotonic()
                carry = 0.0
                continue
            time.sleep(VCPU_TICK)
            now = time.monotonic()
            elapsed = min(now - last, 0.1)
            last = now
            carry += self.dirty_rate * (100 - self.throttle) / 100.0 * elapsed
            n = int(carry)
            carry -= n
            if n or self.drives:
                with self.lock:
                    if self.state is RunState.RUNNING:
                        self._dirty_locked(n)
                        self._write_drives_locked()

    def dirty(self, n: int) -> None:
        """Do ``n`` vCPU writes now, whatever the run state (x-simvm-dirty)."""
        with self.lock:
            self._dirty_locked(n)

    def _dirty_locked(self, n: int) -> None:
        rng = self._vcpu_rng
        mem = self.memory
        ps = self.page_size
        count = self.guest_pages
        dirty = self._dirty
        for _ in range(n):
            page = rng.randrange(count)
            off = page * ps + rng.randrange(ps - WRITE_LEN)
            mem[off : off + WRITE_LEN] = rng.randbytes(WRITE_LEN)
            if dirty is not None:
                dirty.add(page)
        self.writes += n

    # -- disks -----------------------------------------------------------------------

    def _cursor_offset(self, index: int) -> int:
        return self.cursor_page * self.page_size + len(CURSOR_MAGIC) + index * _SEQ.size

    def _init_cursor(self) -> None:
        """A cold start: each disk goes on after its last record (the guest's boot)."""
        base = self.cursor_page * self.page_size
        self.memory[base : base + self.page_size] = bytes(self.page_size)
        self.memory[base : base + len(CURSOR_MAGIC)] = CURSOR_MAGIC
        for i, drive in enumerate(self.drives):
            _SEQ.pack_into(self.memory, self._cursor_offset(i), drive.next_seq_on_disk())

    def _write_drives_locked(self) -> None:
        if not self.drives:
            return  # without disks the last page is the guest's like any other
        base = self.cursor_page * self.page_size
        if self.memory[base : base + len(CURSOR_MAGIC)] != CURSOR_MAGIC:
            # memory that came from a simvm without disks: start as a cold boot would
            self._init_cursor()
        for i, drive in enumerate(self.drives):
            if not drive.writable:
                continue
            off = self._cursor_offset(i)
            (seq,) = _SEQ.unpack_from(self.memory, off)
            try:
                drive.write(seq)
            except OSError as exc:
                drive.failed = True
                log.error("disk %s: write failed: %s", drive.spec.file, exc)
                # QEMU's event for a failed guest write (werror=report: the guest sees it)
                self._emit(
                    "BLOCK_IO_ERROR",
                    {
                        "device": f"drive{i}",
                        "operation": "write",
                        "action": "report",
                        "nospace": exc.errno == errno.ENOSPC,
                        "reason": exc.strerror or str(exc),
                    },
                )
                continue
            _SEQ.pack_into(self.memory, off, seq + 1)
            if self._dirty is not None:
                self._dirty.add(self.cursor_page)

    def _flush_drives(self) -> None:
        for drive in self.drives:
            try:
                drive.flush()
            except OSError as exc:
                drive.failed = True
                log.error("disk %s: flush failed: %s", drive.spec.file, exc)

    def disk_status(self) -> list[dict[str, Any]]:
        """Each disk and the next sequence number its guest will write (memory frozen)."""
        with self.lock:
            out = []
            for i, drive in enumerate(self.drives):
                (seq,) = _SEQ.unpack_from(self.memory, self._cursor_offset(i))
                out.append(
                    {
                        "file": drive.spec.file,
                        "readonly": drive.spec.readonly,
                        "cache": drive.spec.cache,
                        "next-seq": seq,
                        "failed": drive.failed,
                    }
                )
            return out

    def close_drives(self) -> None:
        with self.lock:
            for drive in self.drives:
                try:
                    drive.close()
                except OSError as exc:
                    log.error("disk %s: close failed: %s", drive.spec.file, exc)
            self.drives = []

    # -- dirty log, for migration ----------------------------------------------------

    def start_dirty_log(self) -> None:
        with self.lock:
            self._dirty = set()

    def sync_dirty(self) -> list[int]:
        """The pages dirtied since the last sync, sorted; starts a new period."""
        with self.lock:
            dirty = self._dirty
            self._dirty = set() if dirty is not None else None
        return sorted(dirty) if dirty else []

    def stop_dirty_log(self) -> None:
        with self.lock:
            self._dirty = None
            self.throttle = 0

    # -- checksums -------------------------------------------------------------------

    def sha256(self) -> bytes:
        """sha256 of all memory, with memory frozen meanwhile."""
        with self.lock:
            return hashlib.sha256(self.view).digest()


def _fill(memory: mmap.mmap, seed: int | None) -> None:
    """Pseudo-random content, fast: a 1 MiB random pool, rotated differently for every MiB,
    and a random 8-byte stamp at the start of every page, so that no two pages are equal
    (a page landing at the wrong index must change the checksum)."""
    rng = random.Random(seed) if seed is not None else random.Random()
    chunk = 1 << 20
    pool = rng.randbytes(chunk)
    for base in range(0, len(memory), chunk):
        k = rng.randrange(chunk)
        memory[base : base + chunk - k] = pool[k:]
        memory[base + chunk - k : base + chunk] = pool[:k]
    getbits = rng.getrandbits
    pack = _STAMP.pack_into
    for off in range(0, len(memory), PAGE_SIZE):
        pack(memory, off, getbits(64))
