"""Domain lifecycle events: an append-only log in the host state directory that both
daemons write and srcd's Events RPC follows.

Why a file: a host's events come from two processes (dstd persists and starts incoming
domains, srcd does everything else), and srcd serves the stream. A shared append-only log
needs no connection between the two daemons, keeps working while either restarts, and
costs one small write per event. Each event is one JSON line, appended under an flock of
the log (so that lines from the two daemons never interleave). The log is bounded: a
writer that finds it past ``max_bytes`` renames it to ``events.log.1`` (replacing the
previous one) under the same lock; a follower notices the new file by its inode and drains
the old one first. Events are not fsync'd: they are a notification, not a record.

A follower that sleeps through two rotations misses the events of the first rotated
file: with the default size (about 7000 events) that takes thousands of events within one
interval, which no host makes. The follower wakes on a short interval (inotify would
need a dependency or ctypes for a gain of a few milliseconds).

The words are virsh event's (event 'lifecycle'): the event type and its detail, e.g.
``Started Booted``, ``Stopped Migrated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("vmmigrate.events")

LOG_NAME = "events.log"
DEFAULT_MAX_BYTES = 1024 * 1024
FOLLOW_INTERVAL = 0.05  # seconds between two looks at the log when it has nothing new

# libvirt's lifecycle event types and the details used here, as virsh event prints them
DEFINED_ADDED = ("Defined", "Added")
DEFINED_UPDATED = ("Defined", "Updated")
UNDEFINED_REMOVED = ("Undefined", "Removed")
STARTED_BOOTED = ("Started", "Booted")
STARTED_MIGRATED = ("Started", "Migrated")
SUSPENDED_PAUSED = ("Suspended", "Paused")
RESUMED_UNPAUSED = ("Resumed", "Unpaused")
RESUMED_MIGRATED = ("Resumed", "Migrated")
STOPPED_SHUTDOWN = ("Stopped", "Shutdown")
STOPPED_DESTROYED = ("Stopped", "Destroyed")
STOPPED_MIGRATED = ("Stopped", "Migrated")
# An emulator that went without being asked (common/hypervisor.py on_gone): libvirt sends
# STOPPED_FAILED ("host emulator failed") when the monitor closes without a SHUTDOWN event
# (a crash, a kill from outside), STOPPED_SHUTDOWN when it shut down (the guest powered
# off). libvirt's STOPPED_CRASHED is for a guest panic acted on by <on_crash>: no <panic>
# device is supported here (docs/GUESTS.md), so nothing reports one.
STOPPED_FAILED = ("Stopped", "Failed")


def stopped_unasked(clean: bool) -> tuple[str, str]:
    """The event for an emulator that went without being asked: ``clean`` when it shut
    down (exit status 0, or a SHUTDOWN event first), a failure otherwise."""
    return STOPPED_SHUTDOWN if clean else STOPPED_FAILED


@dataclasses.dataclass(frozen=True)
class Event:
    domain: str
    uuid: str
    event: str
    detail: str
    time_unix: float = 0.0
    daemon: str = ""  # which daemon saw it (srcd or dstd)

    def text(self) -> str:
        """virsh event's line for it."""
        return f"event 'lifecycle' for domain '{self.domain}': {self.event} {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EventLog:
    """The event log of one host."""

    def __init__(self, state_dir: Path, daemon: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = state_dir / LOG_NAME
        self.rotated = state_dir / (LOG_NAME + ".1")
        self.daemon = daemon
        self.max_bytes = max_bytes

    def emit(self, domain: str, uuid: str, kind: tuple[str, str]) -> None:
        """Append one event. Never raises: a failed event must not fail the operation
        it reports (it is logged instead)."""
        ev = Event(domain, uuid, kind[0], kind[1], time.time(), self.daemon)
        line = (json.dumps(ev.to_dict(), sort_keys=True) + "\n").encode()
        try:
            self._append(line)
        except OSError as exc:
            log.warning("event_not_written", path=str(self.path), error=str(exc))
        log.debug("domain_event", domain=domain, lifecycle=kind[0], detail=kind[1])

    def _append(self, line: bytes) -> None:
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino != _inode(self.path):
                    continue  # rotated between open and lock: write to the new log
                if os.fstat(fd).st_size + len(line) > self.max_bytes:
                    os.replace(self.path, self.rotated)
                    continue  # the next round creates a fresh log
                os.write(fd, line)
                return
            finally:
                os.close(fd)  # closing releases the lock


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return -1


class _Reader:
    """Reads whole lines from one open log file, from where it stands."""

    def __init__(self, path: Path, at_end: bool) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.inode = os.fstat(self.fd).st_ino
        if at_end:
            os.lseek(self.fd, 0, os.SEEK_END)
        self.partial = b""

    def lines(self) -> list[bytes]:
        chunks = []
        while chunk := os.read(self.fd, 65536):
            chunks.append(chunk)
        data = self.partial + b"".join(chunks)
        *whole, self.partial = data.split(b"\n")
        return whole

    def close(self) -> None:
        os.close(self.fd)


def _parse(line: bytes) -> Event | None:
    try:
        data = json.loads(line)
        return Event(**{f.name: data[f.name] for f in dataclasses.fields(Event)})
    except (ValueError, KeyError, TypeError):
        return None  # a torn or foreign line: skipped


async def follow(log_: EventLog, interval: float = FOLLOW_INTERVAL) -> AsyncIterator[Event]:
    """The events appended from now on, in order, until the caller stops iterating."""
    reader = _Reader(log_.path, at_end=True)
    try:
        while True:
            lines = reader.lines()
            if not lines and _inode(log_.path) not in (reader.inode, -1):
                # rotated: drain the old file once more (a line may have landed in it
                # since the read above), then go on with the new one from its start
                old, reader = reader, _Reader(log_.path, at_end=False)
                lines = old.lines()
                old.close()
            for line in lines:
                ev = _parse(line)
                if ev is not None:
                    yield ev
            if not lines:
                await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(OSError):
            reader.close()
