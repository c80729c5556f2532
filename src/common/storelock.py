"""The host store's store-wide lock, and the generation counter of ``domains/``.

The lock (``locks/store.lock``, ``flock(LOCK_EX)``, blocking, plus a ``threading.Lock``
because threads of one process share the open file) is held by every mutation of
``domains/`` and ``jobs/``, by every check-then-act (conflict checks read the current state
under it), by job-lock acquisition and release, and by the start-up cleanup of leftover temp
files (which must not race with a write in progress). It is held for a scan of ``domains/``
and one or two fsyncs, never across an RPC.

The generation counter lives in the first 8 bytes of the lock file: every change of
``domains/`` is bracketed by it (odd while a change is under way, so a writer that dies
half-way leaves every reader re-scanning, never trusting, once the change has been odd for
longer than a live writer takes: common/definitions.py's ODD_GRACE). It needs no
durability: caches do not outlive the processes that share it.

After it, the change log: a count of entries (bytes 8-16), then a ring of LOG_SLOTS entries,
one per file a change touched: the generation the change ended at, the directory's inode
and its mtime before and after the change, and the file's name. A reader that saw
generation g0 (and the directory's inode and mtime then) learns from it which files changed
since, instead of re-reading every file's status (common/definitions.py): only if the log
has an entry for every generation since g0 and the directory's mtimes chain from what the
reader saw to what it sees now, so that nothing changed the directory outside the store.
Entries are written before the generation turns even, and a reader checks that the
generation did not move while it read them.

After the ring, at JOURNAL_GEN_AT, a second counter for ``jobs/``: every write or removal
that can change the set of incoming reservations is bracketed by it (odd while under way),
so that a process's index of them (common/incomingindex.py) is known current without a
scan of ``jobs/`` while the counter is even and where the process left it.

Not fork-safe beyond the basics: a forked child reopens the lock file, but should make its
own store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import structlog
from vmmigrate.common.durable import storage_errors
from vmmigrate.common.errors import StorageError

log = structlog.get_logger("vmmigrate.store")

# generation after the change, directory inode, directory mtime_ns before and after, name
_ENTRY = struct.Struct("<QQQQ48s")
LOG_SLOTS = 1024
_COUNT_AT = 8
_RING_AT = 16
JOURNAL_GEN_AT = _RING_AT + LOG_SLOTS * _ENTRY.size
DirState = tuple[int, int, int]  # (generation, directory inode, directory mtime_ns)
_Entry = tuple[int, int, int, str]  # (directory inode, mtime_ns before, after, file name)


class StoreLock:
    """The store lock of one state directory, for one process and its threads."""

    def __init__(self, path: Path, state_dir: Path) -> None:
        self.path = path
        self._state_dir = state_dir
        self._tlock = threading.Lock()
        self._owner: int | None = None  # the thread holding the lock
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
        self._owner = None
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
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None
                fcntl.flock(fd, fcntl.LOCK_UN)

    def held_here(self) -> bool:
        """Does the calling thread hold the store lock?"""
        return self._owner == threading.get_ident()

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

    def read_journal_generation(self) -> int:
        """The ``jobs/`` counter (odd, never trusted, until a first change writes it)."""
        data = os.pread(self._fd, 8, JOURNAL_GEN_AT)
        return int.from_bytes(data, "little") if len(data) == 8 else 1

    def write_journal_generation(self, value: int) -> None:
        with storage_errors("write", self.path):
            os.pwrite(self._fd, value.to_bytes(8, "little"), JOURNAL_GEN_AT)

    @contextlib.contextmanager
    def changing(self, directory: Path | None = None, names: Sequence[str] = ()) -> Iterator[None]:
        """Bracket a change of ``domains/`` (lock held): the generation is odd inside. With
        ``directory``, the change is logged: the ``names`` of the files it touched in it
        (none: readers re-scan the whole directory), whether the change succeeded or not
        (a reader re-reads each file's status, so logging a file that did not change costs
        one stat)."""
        before = _dir_stat(directory) if directory is not None else None
        g = self.read_generation()
        self.write_generation(g + 1 if g % 2 == 0 else g + 2)
        try:
            yield
        finally:
            try:
                end = self.read_generation() + 1
                if directory is not None:
                    self._log(end, directory, before, names)
                self.write_generation(end)
            except StorageError as exc:
                # Left odd: every reader keeps re-scanning, which is slow but right.
                log.warning("store_generation_unwritten", error=str(exc))

    # ------------------------------------------------------------------ change log

    def _read_count(self) -> int:
        data = os.pread(self._fd, 8, _COUNT_AT)
        return int.from_bytes(data, "little") if len(data) == 8 else 0

    def _log(
        self,
        generation: int,
        directory: Path,
        before: tuple[int, int] | None,
        names: Sequence[str],
    ) -> None:
        after = _dir_stat(directory)
        ino = after[0] if after is not None else 0
        m_before = before[1] if before is not None and before[0] == ino else 0
        m_after = after[1] if after is not None else 0
        # a change too large for the ring (or of unknown files) is logged as "re-scan"
        encoded = [n.encode() for n in names]
        if not encoded or len(encoded) > LOG_SLOTS // 4 or any(len(n) > 48 for n in encoded):
            encoded = [b""]
        count = self._read_count()
        with storage_errors("write", self.path):
            for name in encoded:
                slot = _RING_AT + (count % LOG_SLOTS) * _ENTRY.size
                entry = _ENTRY.pack(generation, ino, m_before, m_after, name)
                os.pwrite(self._fd, entry, slot)
                count += 1
            os.pwrite(self._fd, count.to_bytes(8, "little"), _COUNT_AT)

    def changes_since(self, seen: DirState, now: DirState) -> list[str] | None:
        """The names of the files changed between two states of the directory (each as
        (generation, inode, mtime_ns), ``now`` read after the generation), or None if the
        log cannot tell (then re-scan): a generation without entries, an entry that says
        "re-scan", a directory changed outside the store, or a writer at work meanwhile."""
        g0, g1 = seen[0], now[0]
        if g0 % 2 or g1 % 2 or g1 < g0 or (g1 - g0) // 2 > LOG_SLOTS // 2:
            return None
        if g1 == g0:
            return [] if seen == now else None
        try:
            groups = self._entries(g0, g1)
            names = _chain(groups, seen, now) if groups is not None else None
            if names is None or self.read_generation() != g1:
                return None
        except (OSError, UnicodeDecodeError):
            return None
        return names

    def _entries(self, g0: int, g1: int) -> dict[int, list[_Entry]] | None:
        """The log's entries of the generations after ``g0`` up to ``g1``, by generation
        (each group in the order written); None if the log is torn."""
        count = self._read_count()
        groups: dict[int, list[_Entry]] = {}
        for k in range(count - 1, max(count - LOG_SLOTS, 0) - 1, -1):
            raw = os.pread(self._fd, _ENTRY.size, _RING_AT + (k % LOG_SLOTS) * _ENTRY.size)
            if len(raw) != _ENTRY.size:
                return None
            gen, ino, m_before, m_after, name = _ENTRY.unpack(raw)
            if gen <= g0:
                break
            if gen <= g1:
                entry = (ino, m_before, m_after, name.rstrip(b"\0").decode())
                groups.setdefault(gen, []).insert(0, entry)
        return groups


def _dir_stat(directory: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _chain(groups: dict[int, list[_Entry]], seen: DirState, now: DirState) -> list[str] | None:
    """The files named by one log entry group per generation from ``seen`` to ``now``, if
    the groups are all there and the directory's (inode, mtime) chain through them."""
    ino, mtime = seen[1], seen[2]
    names: list[str] = []
    for gen in range(seen[0] + 2, now[0] + 1, 2):
        group = groups.get(gen)
        if not group:
            return None
        g_ino, m_before, m_after, _ = group[0]
        if g_ino != ino or m_before != mtime or not m_before:
            return None
        for _, _, _, name in group:
            if not name:
                return None
            names.append(name)
        mtime = m_after
    if (ino, mtime) != (now[1], now[2]):
        return None
    return list(dict.fromkeys(names))
