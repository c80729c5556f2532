"""The source side of a migration: iterative precopy over one TCP connection.

One thread per migration runs :meth:`OutgoingMigration._run`:

1. setup: connect to ``tcp:HOST:PORT`` (or ``unix:PATH``), send the header, turn the dirty log on;
2. precopy: pass 1 sends every page, each later pass the pages dirtied during the one
   before; after each pass :func:`simvm.migration.decide` says switch over or go on (and
   sets the auto-converge throttle); max-bandwidth is enforced by a token bucket;
3. switchover: stop the vCPU (run state finish-migrate, STOP), send the last dirty pages
   at full speed, then 'E' with the sha256 of the whole memory; wait for the
   destination's ACK on the return path; downtime = stop to ACK;
4. the VM ends in ``postmigrate``; status ``completed``.

On any error the status goes to ``failed`` (error-desc says why, with the destination's
own reason when it sent one) and on migrate_cancel to ``cancelling`` then ``cancelled``;
either way the VM first goes back to running if the switchover had stopped it (QEMU
resumes the source), and only then is the final status set, so a client that sees
``failed`` or ``cancelled`` already sees the VM running.

The point of no return is sending 'E': after it, the destination may start the guest as
soon as its checksum matches, so migrate_cancel is ignored from then on and the
destination's verdict alone decides between ``completed`` and ``failed``. (Before it, a
cancelled stream is incomplete and the destination refuses it.) If the ACK is lost on the
way back, both sides run: the same window QEMU has, and why libvirt confirms afterwards.

A second thread reads the return path for the whole migration, so a NAK the destination
sends before closing is not lost behind our own failing writes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from vmmigrate.simvm import stream
from vmmigrate.simvm.machine import Machine, RunState
from vmmigrate.simvm.migration import (
    Capabilities,
    EmitFn,
    MigrationStatus,
    Parameters,
    PassStats,
    StatusCell,
    TokenBucket,
    decide,
)

log = logging.getLogger("simvm.outgoing")

BATCH_PAGES = 512  # 2 MiB per sendall at full speed
CONNECT_TIMEOUT = 10.0
ACK_TIMEOUT = 60.0


class MigrationError(Exception):
    """The outgoing migration failed; the message becomes query-migrate's error-desc."""


class _Cancelled(Exception):
    pass


def parse_tcp_uri(uri: str) -> tuple[str, int]:
    """``tcp:HOST:PORT`` (HOST may be ``[v6]``) -> (host, port); ValueError otherwise."""
    if not uri.startswith("tcp:"):
        raise ValueError(uri)
    rest = uri[4:].split(",", 1)[0]  # QEMU allows ",ipv4" style options after the port
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(uri)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def parse_migration_uri(uri: str) -> tuple[str, int] | str:
    """``tcp:HOST:PORT`` -> (host, port); ``unix:PATH`` -> PATH; ValueError otherwise."""
    if uri.startswith("unix:"):
        path = uri[5:]
        if not path or "\0" in path:
            raise ValueError(uri)
        return path
    return parse_tcp_uri(uri)


def connect(addr: tuple[str, int] | str, timeout: float) -> socket.socket:
    """A connected stream socket to a parsed migration address."""
    if isinstance(addr, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        return sock
    sock = socket.create_connection(addr, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def describe(addr: tuple[str, int] | str) -> str:
    return addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"


class OutgoingMigration:
    def __init__(
        self,
        machine: Machine,
        *,
        vm_uuid: str,
        uri: str,
        params: Parameters,
        caps: Capabilities,
        emit: EmitFn,
    ) -> None:
        self._machine = machine
        self._vm_uuid = vm_uuid
        self._addr = parse_migration_uri(uri)
        self._params = params
        self._caps = caps
        self._emit = emit
        self.status = StatusCell("source", emit, lambda: caps.events)
        self._cancel = threading.Event()
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._verdict: tuple[bool, str] | None = None
        self._verdict_ready = threading.Event()
        self._scratch = memoryview(bytearray(BATCH_PAGES * machine.page_size))
        self._return_path: threading.Thread | None = None
        self._past_return = False  # 'E' sent: migrate_cancel no longer applies
        self._stopped_from: RunState | None = None  # run state the switchover stopped
        self._thread = threading.Thread(target=self._run, name="simvm-migrate-out", daemon=True)
        # statistics (written by the migration thread, read by query-migrate)
        self._auto_converge = caps.auto_converge
        self._start = time.monotonic()
        self._setup_time = 0.0
        self._end: float | None = None
        self._downtime: float | None = None
        self._transferred = 0
        self._normal = 0
        self._zero = 0
        self._remaining = machine.page_count * machine.page_size
        self._bandwidth = 0.0  # bytes/s, last pass
        self._pages_per_second = 0.0
        self._dirty_rate = 0.0  # pages/s, last pass
        self._sync_count = 0
        self._passes = 0
        self._final_throttle = 0
        self.error = ""

    # -- QMP-facing -------------------------------------------------------------------

    def start(self) -> None:
        self.status.advance(MigrationStatus.SETUP)
        self._thread.start()

    def cancel(self) -> None:
        """migrate_cancel: tear the stream down; the thread rolls the VM back."""
        with self._sock_lock:
            if self._past_return:
                log.info("migrate_cancel ignored: the end of the stream is already sent")
                return
            if not self.status.advance(MigrationStatus.CANCELLING):
                return
            self._cancel.set()
        self._shutdown_socket()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def info(self) -> dict[str, Any]:
        """query-migrate, in QEMU's shape."""
        status = self.status.value
        now = self._end if self._end is not None else time.monotonic()
        info: dict[str, Any] = {
            "status": status.value,
            "total-time": int((now - self._start) * 1000),
            "setup-time": int(self._setup_time * 1000),
        }
        if status is MigrationStatus.SETUP:
            return info
        ps = self._machine.page_size
        info["ram"] = {
            "transferred": self._transferred,
            "remaining": 0 if status is MigrationStatus.COMPLETED else self._remaining,
            "total": self._machine.page_count * ps,
            "duplicate": self._zero,
            "skipped": 0,
            "normal": self._normal,
            "normal-bytes": self._normal * ps,
            "dirty-pages-rate": int(self._dirty_rate),
            "mbps": round(self._bandwidth * 8 / 1e6, 3),
            "dirty-sync-count": self._sync_count,
            "page-size": ps,
            "pages-per-second": int(self._pages_per_second),
            "postcopy-requests": 0,
            "multifd-bytes": 0,
        }
        if status is MigrationStatus.COMPLETED and self._downtime is not None:
            info["downtime"] = int(self._downtime * 1000)
        else:
            bw = self._bandwidth
            info["expected-downtime"] = (
                int(self._remaining / bw * 1000) if bw > 0 else self._params.downtime_limit
            )
        if self._auto_converge:
            info["cpu-throttle-percentage"] = (
                self._machine.throttle if status is MigrationStatus.ACTIVE else self._final_throttle
            )
        if status is MigrationStatus.FAILED:
            info["error-desc"] = self.error
        return info

    # -- the migration thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._setup()
            last = self._precopy()
            self._switchover(last)
        except BaseException as exc:
            if self._return_path is not None and not self._cancel.is_set():
                # the destination's NAK may still be on its way behind our failed write
                self._verdict_ready.wait(1.0)
            # the VM goes back first, then the final status (see the module docstring);
            # a VM that was not running goes to postmigrate, as QEMU does
            if self._machine.state is RunState.FINISH_MIGRATE:
                was_running = self._stopped_from is RunState.RUNNING
                self._machine.transition(RunState.RUNNING if was_running else RunState.POSTMIGRATE)
            self._end = time.monotonic()
            self._cleanup()
            if self._cancel.is_set():
                self.status.advance(MigrationStatus.CANCELLED)
            else:
                self.error = _describe(exc, self._verdict)
                log.warning("migration failed: %s", self.error)
                self.status.advance(MigrationStatus.FAILED)
            if not isinstance(exc, Exception):
                raise
        else:
            self._end = time.monotonic()
            self._cleanup()
            self._machine.transition(RunState.POSTMIGRATE)
            self.status.advance(MigrationStatus.COMPLETED)

    def _cleanup(self) -> None:
        self._final_throttle = self._machine.throttle
        self._machine.stop_dirty_log()
        self._shutdown_socket()
        with self._sock_lock:
            if self._sock is not None:
                self._sock.close()

    def _shutdown_socket(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):  # not connected (yet, or any more)
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    def _setup(self) -> None:
        try:
            sock = connect(self._addr, CONNECT_TIMEOUT)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MigrationError(
                f"Failed to connect to '{describe(self._addr)}': {reason}"
            ) from exc
        sock.settimeout(None)
        with self._sock_lock:
            self._sock = sock
        self._check_cancel()
        self._return_path = threading.Thread(
            target=self._read_return_path, args=(sock,), name="simvm-return-path", daemon=True
        )
        self._return_path.start()
        m = self._machine
        header = stream.Header(m.page_size, m.page_count, self._vm_uuid)
        self._send([header.pack()])
        m.start_dirty_log()
        self._setup_time = time.monotonic() - self._start
        if not self.status.advance(MigrationStatus.ACTIVE):
            raise _Cancelled

    def _read_return_path(self, sock: socket.socket) -> None:
        verdict: tuple[bool, str] = (False, "")
        try:
            verdict = stream.read_return_path(sock)
        except OSError as exc:
            log.debug("return path closed: %s", exc)
        self._verdict = verdict
        self._verdict_ready.set()
        if not verdict[0]:
            # the destination gave up (or went away): interrupt a sender that may be
            # blocked on a peer that no longer reads, as QEMU's return path does
            self._shutdown_socket()

    def _precopy(self) -> list[int]:
        """Passes until :func:`decide` says switch over; returns the pages still dirty."""
        m = self._machine
        bucket = TokenBucket(lambda: self._params.max_bandwidth)
        pending: Sequence[int] = range(m.page_count)
        while True:
            self._passes += 1
            number = self._passes
            self._sync_count += 1  # pass 1 starts from QEMU's initial bitmap sync
            started = time.monotonic()
            sent_before = self._transferred
            self._send_pages(pending, bucket)
            self._send([stream.encode_end_of_pass(number, len(pending), final=False)])
            elapsed = time.monotonic() - started
            sent = self._transferred - sent_before
            if elapsed > 0.001 and sent >= 64 * 1024:
                self._bandwidth = sent / elapsed
                self._pages_per_second = len(pending) / elapsed
            pending = m.sync_dirty()
            dirtied = len(pending)
            self._dirty_rate = dirtied / elapsed if elapsed > 0 else 0.0
            self._remaining = dirtied * m.page_size
            self._check_cancel()
            decision = decide(
                PassStats(self._remaining, self._bandwidth, sent, dirtied * m.page_size),
                self._params,
                self._caps.auto_converge,
                m.throttle,
            )
            log.info(
                "pass %d: %d bytes in %.3f s (%.0f MB/s), %d pages dirtied meanwhile",
                number,
                sent,
                elapsed,
                sent / elapsed / 1e6 if elapsed > 0 else 0.0,
                dirtied,
            )
            if decision.switchover:
                return pending
            if decision.throttle != m.throttle:
                log.info(
                    "auto-converge: vCPU throttled %d%% -> %d%%", m.throttle, decision.throttle
                )
                m.throttle = decision.throttle
            if self._caps.events:
                self._emit("MIGRATION_PASS", {"pass": number + 1})

    def _switchover(self, pending: list[int]) -> None:
        m = self._machine
        stopped_at = time.monotonic()
        self._stopped_from = m.transition(RunState.FINISH_MIGRATE)
        # the vCPU cannot write any more: these are the last dirty pages
        last = sorted(set(pending) | set(m.sync_dirty()))
        digest: list[bytes] = []
        hasher = threading.Thread(target=lambda: digest.append(m.sha256()), daemon=True)
        hasher.start()  # hashlib drops the GIL: hash while the last pages go out
        self._send_pages(last, None)  # QEMU ignores the rate limit for the final pass too
        self._passes += 1
        self._send([stream.encode_end_of_pass(self._passes, len(last), final=True)])
        hasher.join()
        with self._sock_lock:
            self._check_cancel()
            self._past_return = True
        self._send([stream.encode_end(digest[0])])
        if not self._verdict_ready.wait(ACK_TIMEOUT):
            raise MigrationError("the destination did not acknowledge the memory checksum")
        assert self._verdict is not None
        ok, reason = self._verdict
        if not ok:
            raise MigrationError(_refusal(reason))
        self._downtime = time.monotonic() - stopped_at
        self._remaining = 0
        log.info("switchover: %d pages, downtime %.3f s", len(last), self._downtime)

    def _send_pages(self, pages: Sequence[int], bucket: TokenBucket | None) -> None:
        m = self._machine
        i = 0
        while i < len(pages):
            self._check_cancel()
            n = bucket.batch_pages(m.page_size, BATCH_PAGES) if bucket else BATCH_PAGES
            chunk = pages[i : i + n]
            batch = stream.encode_batch(m.view, chunk, self._scratch, m.page_size)
            if bucket is not None:
                bucket.take(batch.wire_bytes, self._cancel)
                self._check_cancel()
            self._send([batch.head, batch.data])
            self._normal += batch.normal
            self._zero += batch.zero
            i += len(chunk)
            self._remaining = (len(pages) - i) * m.page_size

    def _send(self, parts: list[bytes | memoryview]) -> None:
        sock = self._sock
        assert sock is not None
        try:
            for part in parts:
                sock.sendall(part)
        except OSError as exc:
            self._check_cancel()
            raise MigrationError(f"Unable to write to socket: {exc.strerror or exc}") from exc
        self._transferred += sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def _refusal(reason: str) -> str:
    if reason:
        return f"the destination refused the migration: {reason}"
    return "the destination closed the connection before acknowledging the memory checksum"


def _describe(exc: BaseException, verdict: tuple[bool, str] | None) -> str:
    """error-desc: the destination's own reason when it gave one, else ours."""
    if verdict is not None and not verdict[0] and verdict[1]:
        return _refusal(verdict[1])
    return str(exc) or type(exc).__name__
