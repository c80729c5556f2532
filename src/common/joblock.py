"""Source migration job locks: ``STATE_DIR/locks/<uuid>.job``, ``flock(LOCK_EX | LOCK_NB)``.

The source role's migration job on one domain is held from Begin to Confirm (libvirt's
async job MIGRATION_OUT). flock conflicts between two ``open()`` calls even inside one
process, so the lock excludes other threads, other stores and the other daemon alike, and
the kernel drops it when its holder dies. Whether a job is held is probed, under the store
lock, by trying the lock; since acquisition also runs under the store lock, a probe can
never make an acquisition fail.

A lock file stays when its job ends: creating a file costs an inode allocation, the
dearest file operation of an offline migration on a busy ext4 (more than the job's own
journal record), and the same domain is usually migrated again (back, or on to the next
host). What is left for domains no longer defined here goes with :meth:`JobLocks.sweep`,
which srcd's housekeeping runs now and then.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

import structlog
from vmmigrate.common.durable import storage_errors
from vmmigrate.common.errors import JobActive
from vmmigrate.common.storelock import StoreLock

log = structlog.get_logger("vmmigrate.store")


class JobLock:
    """A held source-side migration job on one domain (``locks/<uuid>.job``).

    Release it exactly when the job ends (Confirm, or a failed Begin/Perform); release is
    idempotent. Also a context manager. If the process dies, the kernel drops the lock.
    """

    def __init__(self, owner: JobLocks, uuid: str, name: str, fd: int, path: Path) -> None:
        self._owner = owner
        self.uuid = uuid
        self.name = name
        self._fd: int | None = fd
        self._path = path

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owned_by(self, owner: JobLocks) -> bool:
        """Is this a lock ``owner`` handed out, still held?"""
        return self.held and self._owner is owner

    def release(self) -> None:
        self._owner.release(self)

    def _drop(self) -> None:
        """Unlock; the caller holds the store lock. The file stays for the next job on
        the domain (see the module docstring)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> JobLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<JobLock {self.name!r} {self.uuid} {state}>"


def job_busy(name: str) -> JobActive:
    return JobActive(f"another migration job is already running for domain '{name}'")


class JobLocks:
    """The job locks of one store; UUIDs are canonical (the caller checked them)."""

    def __init__(self, directory: Path, lock: StoreLock) -> None:
        self.directory = directory
        self._lock = lock
        self._held: dict[str, JobLock] = {}
        # a forked child holds none of its parent's locks
        lock.on_fork(self._held.clear)

    def _path(self, uuid: str) -> Path:
        return self.directory / f"{uuid}.job"

    def held_locked(self, uuid: str) -> bool:
        """Is a source job held on ``uuid``, by anyone? The caller holds the store lock."""
        if uuid in self._held:
            return True
        path = self._path(uuid)
        with storage_errors("open", path):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False  # free: closing the file gives the probe's lock back
        finally:
            os.close(fd)

    def acquire_locked(self, uuid: str, name: str) -> JobLock:
        """Take the job on ``uuid`` without waiting; the caller holds the store lock and
        has checked that no incoming migration holds the domain."""
        if uuid in self._held:
            raise job_busy(name)
        path = self._path(uuid)
        with storage_errors("open", path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with storage_errors("lock", path):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # Paranoia against anyone removing lock files outside the store lock:
                    # the lock only counts if the locked inode still has the name.
                    locked = os.stat(path).st_ino == os.fstat(fd).st_ino
                except BlockingIOError:
                    locked = False
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            raise job_busy(name)
        lock = JobLock(self, uuid, name, fd, path)
        self._held[uuid] = lock
        return lock

    def sweep(self, keep: frozenset[str]) -> int:
        """Remove the lock files no job holds, except those of the UUIDs in ``keep`` (the
        domains defined here); the caller holds the store lock, under which every
        acquisition runs, so no acquisition can lock a file this removes. Returns how many
        went."""
        removed = 0
        with storage_errors("list", self.directory):
            names = [n for n in os.listdir(self.directory) if n.endswith(".job")]
        for name in names:
            uuid = name[: -len(".job")]
            if uuid in keep or uuid in self._held:
                continue
            path = self.directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # gone meanwhile, or not ours to open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # locked by us: no holder; unlink before the lock goes with the close
                os.unlink(path)
                removed += 1
            except OSError:
                continue  # BlockingIOError: a job holds it
            finally:
                os.close(fd)
        return removed

    def release(self, lock: JobLock) -> None:
        with self._lock.held():
            if not lock.held:
                return
            if self._held.get(lock.uuid) is lock:
                del self._held[lock.uuid]
            lock._drop()
        log.debug("job_released", name=lock.name, uuid=lock.uuid)

    def release_all(self) -> None:
        for lock in list(self._held.values()):
            lock.release()
