"""Crash-safe file primitives for the host state directory (docs/ARCHITECTURE.md section 6).

Every file that must survive a crash is written the same way:

    1. create ``.tmp-<random>`` in the *same* directory (same file system, so the rename
       below is atomic), write all bytes, fsync the file;
    2. rename it over the target (``os.replace``: readers see the old file or the new one,
       never a mix);
    3. fsync the directory, so that the rename itself survives a power cut.

A crash before step 2 leaves only a ``.tmp-*`` file behind, which :func:`clean_temp_files`
removes at the next start. That cleanup must not run while another process may be writing
into the same directory; the host store does it under its store-wide lock, and writes
under that same lock.

OSErrors are translated here, once (docs/ARCHITECTURE.md section 10): ENOSPC and EDQUOT become
:class:`~common.errors.StorageFull`, everything else :class:`~common.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import structlog
from vmmigrate.common.errors import StorageError, StorageFull

log = structlog.get_logger("vmmigrate.store")

TEMP_PREFIX = ".tmp-"

# A context manager around the one step of a write that changes a directory's content

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_error(action: str, path: Path, exc: OSError) -> StorageError:
    """The one translation of an OSError: StorageFull for ENOSPC/EDQUOT, else StorageError."""
    if exc.errno in _FULL_ERRNOS:
        return StorageFull(f"cannot {action} {path}: No space left on device")
    reason = exc.strerror or str(exc)
    return StorageError(f"cannot {action} {path}: {reason}")


@contextlib.contextmanager
def storage_errors(action: str, path: Path) -> Iterator[None]:
    """Translate any OSError raised inside into :func:`storage_error`'s ("cannot ACTION
    PATH: reason"). Catch the OSErrors that are answers (FileNotFoundError, BlockingIOError)
    inside the block: whatever leaves it is a storage failure."""
    try:
        yield
    except OSError as exc:
        raise storage_error(action, path, exc) from exc


def report_unreadable(path: Path | str, reason: str) -> None:
    """A state file that cannot be used is skipped and reported, never fatal: one bad file
    must not take the daemon (or every other domain or job) down with it."""
    log.warning("store_file_unreadable", path=str(path), reason=reason)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir_raw(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, removals) durable."""
    with storage_errors("sync", path):
        _fsync_dir_raw(path)


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mtime_ns: int | None = None,
    durable: bool = True,
) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    On any failure before the rename, the temp file is removed and the target is untouched.
    If only the final directory fsync fails, the new content is already in place (but may
    not survive a power cut); the error is still raised.

    ``mtime_ns`` sets the new file's modification time (and access time) before the
    rename. The host store uses it to give every version of a file a distinct
    (inode, mtime) pair, which its parse cache relies on: file systems reuse a freed inode
    at once, and some keep timestamps at clock-tick granularity.

    ``durable=False`` keeps the atomicity (readers see the old or the new content, never a
    mix) but skips both fsyncs: for records whose loss in a crash is harmless.
    """
    directory = path.parent
    tmp = directory / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}"
    with storage_errors("write", path):
        # 0o600: definitions and journal records are the daemons' business only (libvirt
        # keeps /etc/libvirt/qemu/*.xml 0600 as well).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_all(fd, data)
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            _fsync_dir_raw(directory)


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    return fn


def _sync_filesystem(fds: Sequence[int]) -> None:
    """Make the data of the files open at ``fds`` durable in one flush: syncfs(2) on their
    file system (every file's data written so far), or an fsync each where the C library
    has no syncfs."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        for fd in fds:
            os.fsync(fd)
        return
    if syncfs(fds[0]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


WriteItem = tuple[Path, bytes, int | None]  # (path, data, mtime_ns)


def _write_temps(items: Sequence[WriteItem]) -> list[tuple[Path, Path]]:
    """Each item's temp file, written and flushed (one flush for all); [(temp, target)].
    On failure none is left."""
    temps: list[tuple[Path, Path]] = []
    fds: list[int] = []
    try:
        for path, data, mtime_ns in items:
            tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}"
            with storage_errors("write", path):
                fds.append(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
                temps.append((tmp, path))
                _write_all(fds[-1], data)
                if mtime_ns is not None:
                    os.utime(fds[-1], ns=(mtime_ns, mtime_ns))
        with storage_errors("sync", items[0][0].parent):
            _sync_filesystem(fds)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return temps


def _rename_all(
    temps: Sequence[tuple[Path, Path]], after_rename: Callable[[int], None] | None
) -> None:
    for i, (tmp, path) in enumerate(temps):
        try:
            with storage_errors("write", path):
                os.replace(tmp, path)
        except BaseException:
            for left, _ in temps[i:]:
                with contextlib.suppress(OSError):
                    os.unlink(left)
            raise
        if after_rename is not None:
            after_rename(i)


def atomic_write_many(
    items: Sequence[WriteItem],
    *,
    after_rename: Callable[[int], None] | None = None,
) -> None:
    """:func:`atomic_write` for many files, with one flush covering them all (group commit):
    every temp file is written, then made durable by one ``syncfs(2)`` of their file system
    (each file fsync'd where there is none), then renamed over its target, then each
    directory fsync'd once. The order per file is atomic_write's (data durable before the
    rename, the rename durable before returning), so a crash at any instant leaves each
    target its old or its new content; only the number of flushes differs.

    If a write or the flush fails, no target was touched and no temp file is left.
    ``after_rename(i)`` runs after the i-th rename (a failpoint)."""
    if len(items) == 1:
        path, data, mtime_ns = items[0]
        atomic_write(path, data, mtime_ns=mtime_ns)
        if after_rename is not None:
            after_rename(0)
        return
    temps = _write_temps(items)
    _rename_all(temps, after_rename)
    for directory in dict.fromkeys(path.parent for _, path in temps):
        fsync_dir(directory)


def durable_unlink(path: Path, *, durable: bool = True) -> bool:
    """Remove ``path`` and make the removal durable. False if it did not exist.
    ``durable=False``: a plain unlink, for records that may harmlessly come back."""
    with storage_errors("remove", path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        if durable:
            _fsync_dir_raw(path.parent)
    return True


def clean_temp_files(directory: Path) -> int:
    """Remove ``.tmp-*`` files a crashed writer left in ``directory``; returns how many.

    Only call this when no other writer can be active in ``directory`` (see the module
    docstring): it cannot tell a leftover from a write in progress.
    """
    removed = 0
    with storage_errors("clean", directory):
        with os.scandir(directory) as entries:
            names = [
                e.name
                for e in entries
                if e.name.startswith(TEMP_PREFIX) and e.is_file(follow_symlinks=False)
            ]
        for name in names:
            try:
                os.unlink(directory / name)
            except FileNotFoundError:
                continue
            removed += 1
        if removed:
            _fsync_dir_raw(directory)
    return removed
