"""Persistent domain definitions: ``STATE_DIR/domains/<uuid>.xml``, one per domain, named by
its canonical UUID so that no domain name, however hostile, names a path.

Listing costs one stat per file, not one parse: parsed definitions are cached per file,
keyed by (inode, mtime_ns, size). Inodes are reused as soon as they are freed, so every
write stamps the file with a fresh nanosecond mtime under the store lock: two versions of
one file never share a key. On top of that, a whole listing is reused while nothing has
changed: every change of ``domains/`` is bracketed by the store lock's generation counter
(:class:`common.storelock.StoreLock`). A listing is reused only if the generation is even
and unchanged and so is the directory's (inode, mtime), which also catches files dropped in
by hand.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.durable import (
    TEMP_PREFIX,
    atomic_write,
    atomic_write_many,
    durable_unlink,
    fsync_dir,
    report_unreadable,
    storage_errors,
)
from vmmigrate.common.errors import DomainExists, InvalidArgument
from vmmigrate.common.storelock import StoreLock
from vmmigrate.common.uuids import canonical_uuid_or_none

_StatKey = tuple[int, int, int]  # (inode, mtime_ns, size)
_SnapKey = tuple[int, int, int]  # (generation, directory inode, directory mtime_ns)
_Cached = tuple[_StatKey, DomainDef | None]  # None: unreadable, reported once


def find_in(defs: Sequence[DomainDef], key: str) -> DomainDef | None:
    """By name, else by UUID (any case, with or without dashes)."""
    for d in defs:
        if d.name == key:
            return d
    u = canonical_uuid_or_none(key)
    if u is not None:
        for d in defs:
            if d.uuid == u:
                return d
    return None


def check_clash(defs: Sequence[DomainDef], name: str, uuid: str) -> bool:
    """libvirt's virDomainObjListAdd clash rules; True if (name, uuid) is defined."""
    for other in defs:
        if other.uuid == uuid:
            if other.name != name:
                raise DomainExists(f"domain '{other.name}' is already defined with uuid {uuid}")
            return True
    for other in defs:
        if other.name == name:
            raise DomainExists(f"domain '{name}' already exists with uuid {other.uuid}")
    return False


class Definitions:
    """The files in ``domains/``. Writers hold the store lock; readers take none."""

    def __init__(self, directory: Path, lock: StoreLock, max_xml_bytes: int) -> None:
        self.directory = directory
        self._lock = lock
        self._max_xml_bytes = max_xml_bytes
        # file name -> (stat key, parsed definition or None if unreadable)
        self._cache: dict[str, _Cached] = {}
        # the whole of domains/ as of one _SnapKey, see scan()
        self._snapshot: tuple[_SnapKey, tuple[DomainDef, ...]] | None = None

    def path(self, uuid: str) -> Path:
        # canonical UUIDs only: hex digits and dashes.
        return self.directory / f"{uuid}.xml"

    def validated(self, d: DomainDef) -> DomainDef:
        """Re-parse ``d.xml`` exactly as a later read of the stored file will; a
        definition parse_domain made from that XML (within the size limit) is that
        already."""
        if d.parsed and len(d.xml.encode("utf-8")) <= self._max_xml_bytes:
            return d
        parsed = parse_domain(d.xml, max_bytes=self._max_xml_bytes, generate_uuid=False)
        if parsed.name != d.name or parsed.uuid != d.uuid:
            raise InvalidArgument(
                f"domain definition ({d.name!r}, {d.uuid}) does not match its XML "
                f"({parsed.name!r}, {parsed.uuid})"
            )
        return parsed

    # ------------------------------------------------------------------ reading

    def scan(self) -> Sequence[DomainDef]:
        """All readable definitions, re-parsing only files that changed."""
        generation = self._lock.read_generation()
        with storage_errors("list", self.directory):
            dst = os.stat(self.directory)
        snap_key = (generation, dst.st_ino, dst.st_mtime_ns)
        snap = self._snapshot
        if snap is not None and snap[0] == snap_key and generation % 2 == 0:
            return snap[1]
        with storage_errors("list", self.directory):
            new = self._rescan()
        self._cache = new
        defs = tuple(d for _, d in new.values() if d is not None)
        # Reusable only if no store writer was at work before or during the scan.
        if generation % 2 == 0 and self._lock.read_generation() == generation:
            self._snapshot = (snap_key, defs)
        else:
            self._snapshot = None
        return defs

    def _rescan(self) -> dict[str, _Cached]:
        old = self._cache
        new: dict[str, _Cached] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(TEMP_PREFIX) or not name.endswith(".xml"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                hit = old.get(name)
                if hit is not None and hit[0] == key:
                    new[name] = hit
                elif not stat.S_ISREG(st.st_mode):
                    report_unreadable(entry.path, "not a regular file")
                    new[name] = (key, None)
                elif (loaded := self._load(entry.path, name, key)) is not None:
                    new[name] = loaded
        return new

    def _read_file(self, path: str, seen: _StatKey) -> tuple[_StatKey, bytes | None] | None:
        """The bytes of one definition file, or None (reported) if they are not usable;
        None as a whole if the file vanished meanwhile."""
        try:
            # O_NONBLOCK: a FIFO planted in domains/ must not hang the daemon.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            report_unreadable(path, exc.strerror or str(exc))
            return seen, None
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if not stat.S_ISREG(st.st_mode):
                report_unreadable(path, "not a regular file")
                return key, None
            if st.st_size > self._max_xml_bytes:
                report_unreadable(path, f"larger than {self._max_xml_bytes} bytes")
                return key, None
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return key, b"".join(chunks)
        except OSError as exc:
            report_unreadable(path, exc.strerror or str(exc))
            return seen, None
        finally:
            os.close(fd)

    def _load(self, path: str, file_name: str, seen: _StatKey) -> _Cached | None:
        """Read and parse one definition file; None if it vanished meanwhile.

        ``seen`` is the key the directory scan saw; a file that cannot be read is cached
        under it as unreadable, so that it is reported once, not at every listing.
        """
        got = self._read_file(path, seen)
        if got is None:
            return None
        key, data = got
        if data is None:
            return key, None
        try:
            d = parse_domain(data, max_bytes=self._max_xml_bytes, generate_uuid=False)
        except (InvalidArgument, UnicodeDecodeError) as exc:
            report_unreadable(path, str(exc))
            return key, None
        if file_name != f"{d.uuid}.xml":
            report_unreadable(path, f"holds uuid {d.uuid}, not the one in its file name")
            return key, None
        return key, d

    # ------------------------------------------------------------------ writing

    def _remember(self, defs: Sequence[DomainDef]) -> None:
        """Record the exact content of ``domains/`` after our own change (lock held)."""
        g = self._lock.read_generation()
        if g % 2:
            self._snapshot = None
            return
        with storage_errors("list", self.directory):
            dst = os.stat(self.directory)
        self._snapshot = ((g, dst.st_ino, dst.st_mtime_ns), tuple(defs))

    def write(self, d: DomainDef, before: Sequence[DomainDef]) -> None:
        """Write one definition; the caller holds the store lock and scanned ``before``."""
        path = self.path(d.uuid)
        # the generation is odd around the rename only: the flushes are outside, so that
        # lock-free readers (scan) seldom see a change under way and rescan
        atomic_write(
            path, d.xml.encode("utf-8"), mtime_ns=time.time_ns(), renaming=self._lock.changing
        )
        with contextlib.suppress(OSError):
            st = os.stat(path)
            self._cache[path.name] = ((st.st_ino, st.st_mtime_ns, st.st_size), d)
        self._remember([x for x in before if x.uuid != d.uuid] + [d])

    def write_many(
        self,
        ds: Sequence[DomainDef],
        before: Sequence[DomainDef],
        after_rename: Callable[[int], None] | None = None,
    ) -> None:
        """Write several definitions with one flush (durable.atomic_write_many); the caller
        holds the store lock and scanned ``before``. All or none on failure."""
        items = [(self.path(d.uuid), d.xml.encode("utf-8"), time.time_ns()) for d in ds]
        atomic_write_many(items, after_rename=after_rename, renaming=self._lock.changing)
        for d in ds:
            path = self.path(d.uuid)
            with contextlib.suppress(OSError):
                st = os.stat(path)
                self._cache[path.name] = ((st.st_ino, st.st_mtime_ns, st.st_size), d)
        written = {d.uuid for d in ds}
        self._remember([x for x in before if x.uuid not in written] + list(ds))

    def remove_many(self, uuids: Sequence[str], before: Sequence[DomainDef]) -> None:
        """Remove several definitions (canonical UUIDs) with one directory flush; the
        caller holds the store lock and scanned ``before``."""
        if len(uuids) == 1:
            self.remove(uuids[0], before)
            return
        paths = [self.path(u) for u in uuids]
        with storage_errors("remove", self.directory):
            with self._lock.changing():
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            fsync_dir(self.directory)
        for path in paths:
            self._cache.pop(path.name, None)
        gone = set(uuids)
        self._remember([x for x in before if x.uuid not in gone])

    def remove(self, uuid: str, before: Sequence[DomainDef]) -> None:
        """Remove the definition of ``uuid`` (canonical); the caller holds the store lock
        and scanned ``before``."""
        path = self.path(uuid)
        durable_unlink(path, renaming=self._lock.changing)
        self._cache.pop(path.name, None)
        self._remember([x for x in before if x.uuid != uuid])
