"""The host store's store-wide lock, and the generation counter of ``domains/``.

The lock (``locks/store.lock``, ``flock(LOCK_EX)``, blocking, plus a ``threading.Lock``
because threads of one process share the open file) is held by every mutation of
``domains/`` and ``jobs/``, by every check-then-act (conflict checks read the current state
under it), by job-lock acquisition and release, and by the start-up cleanup of leftover temp
files (which must not race with a write in progress). It is held for a scan of ``domains/``
and one or two fsyncs, never across an RPC.

The generation counter lives in the first 8 bytes of the lock file: every change of
``domains/`` is bracketed by it (odd while a change is under way, so a writer that dies
half-way leaves every reader re-scanning, never trusting). It needs no durability: caches do
not outlive the processes that share it.

Not fork-safe beyond the basics: a forked child reopens the lock file, but should make its
own store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
from vmmigrate.common.durable import storage_errors
from vmmigrate.common.errors import StorageError

log = structlog.get_logger("vmmigrate.store")


class StoreLock:
    """The store lock of one state directory, for one process and its threads."""

    def __init__(self, path: Path, state_dir: Path) -> None:
        self.path = path
        self._state_dir = state_dir
        self._tlock = threading.Lock()
        self._pid = os.getpid()
        self._fd = self._open()
        # what else must forget this process's state in a forked child (held job locks)
        self._fork_hooks: list[Callable[[], None]] = []

    def _open(self) -> int:
        with storage_errors("open", self.path):
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def on_fork(self, hook: Callable[[], None]) -> None:
        self._fork_hooks.append(hook)

    def _check_fork(self) -> None:
        # After fork() the child shares the parent's open file description, and so its
        # flock: it must open its own. A lock held by another thread at fork time would
        # never be released in the child, so the thread lock is replaced too.
        if os.getpid() == self._pid:
            return
        self._pid = os.getpid()
        self._tlock = threading.Lock()
        for hook in self._fork_hooks:
            hook()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._open()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The store lock: this process's threads, then the other processes."""
        self._check_fork()
        with self._tlock:
            fd = self._fd
            if fd < 0:
                raise StorageError(f"the store at {self._state_dir} is closed")
            with storage_errors("lock", self.path):
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock file (idempotent); the store refuses every locked call after."""
        with self._tlock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    # ------------------------------------------------------------------ generation

    def init_generation(self) -> None:
        """Start the counter in a new lock file (lock held: two first starts must not both
        reset a counter the other one already moved)."""
        if len(os.pread(self._fd, 8, 0)) != 8:
            self.write_generation(0)

    def read_generation(self) -> int:
        data = os.pread(self._fd, 8, 0)
        return int.from_bytes(data, "little") if len(data) == 8 else 1

    def write_generation(self, value: int) -> None:
        with storage_errors("write", self.path):
            os.pwrite(self._fd, value.to_bytes(8, "little"), 0)

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Bracket a change of ``domains/`` (lock held): the generation is odd inside."""
        g = self.read_generation()
        self.write_generation(g + 1 if g % 2 == 0 else g + 2)
        try:
            yield
        finally:
            try:
                self.write_generation(self.read_generation() + 1)
            except StorageError as exc:
                # Left odd: every reader keeps re-scanning, which is slow but right.
                log.warning("store_generation_unwritten", error=str(exc))
