"""Persistent domain definitions: ``STATE_DIR/domains/<uuid>.xml``, one per domain, named by
its canonical UUID so that no domain name, however hostile, names a path.

Parsed definitions are kept per file, keyed by (inode, mtime_ns, size), and indexed by name
and by UUID: a lookup or a clash check costs a few dictionary look-ups, whatever the number
of domains. Inodes are reused as soon as they are freed, so every write stamps the file with
a fresh nanosecond mtime under the store lock: two versions of one file never share a key.

What changed since the last look is learnt without reading every file's status: every
change of ``domains/`` made through the store is bracketed by the store lock's generation
counter and logged with the names of the files it touched
(:class:`common.storelock.StoreLock`). The view is current while the generation (even) and
the directory's (inode, mtime) are those it last saw; when only the store changed the
directory (the log covers every generation since, and the directory's mtimes chain through
it), only the files it names are looked at again. Anything else (a writer that died
half-way, the log overrun, a file dropped in by hand) costs one stat per file, and a parse
of each file that changed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
from vmmigrate.common.storelock import DirState, StoreLock
from vmmigrate.common.uuids import canonical_uuid_or_none

_StatKey = tuple[int, int, int]  # (inode, mtime_ns, size)
_Cached = tuple[_StatKey, DomainDef | None]  # None: unreadable, reported once

# How long another process's change of domains/ is taken to be under way (readers keep
# their view meanwhile) before it counts as left half-done (readers re-scan), seconds.
ODD_GRACE = 1.0


class _Index:
    """The parsed definitions of ``domains/``, by file name, by UUID and by name."""

    def __init__(self, files: dict[str, _Cached] | None = None) -> None:
        self.files: dict[str, _Cached] = {}
        self.by_uuid: dict[str, DomainDef] = {}
        # name -> {uuid: definition}: names are unique, unless files were dropped in by hand
        self.by_name: dict[str, dict[str, DomainDef]] = {}
        for file_name, cached in (files or {}).items():
            self.put(file_name, cached)

    def put(self, file_name: str, cached: _Cached) -> None:
        self.drop(file_name)
        self.files[file_name] = cached
        d = cached[1]
        if d is not None:
            self.by_uuid[d.uuid] = d
            self.by_name.setdefault(d.name, {})[d.uuid] = d

    def drop(self, file_name: str) -> None:
        old = self.files.pop(file_name, None)
        if old is None or old[1] is None:
            return
        d = old[1]
        self.by_uuid.pop(d.uuid, None)
        named = self.by_name.get(d.name)
        if named is not None:
            named.pop(d.uuid, None)
            if not named:
                del self.by_name[d.name]

    def find(self, key: str) -> DomainDef | None:
        """By name, else by UUID (any case, with or without dashes)."""
        named = self.by_name.get(key)
        if named:
            return next(iter(named.values()))
        u = canonical_uuid_or_none(key)
        return self.by_uuid.get(u) if u is not None else None

    def check_clash(self, name: str, uuid: str) -> bool:
        """libvirt's virDomainObjListAdd clash rules; True if (name, uuid) is defined."""
        other = self.by_uuid.get(uuid)
        if other is not None:
            if other.name != name:
                raise DomainExists(f"domain '{other.name}' is already defined with uuid {uuid}")
            return True
        named = self.by_name.get(name)
        if named:
            first = next(iter(named.values()))
            raise DomainExists(f"domain '{name}' already exists with uuid {first.uuid}")
        return False


class Definitions:
    """The files in ``domains/``. Writers hold the store lock; readers take none (the view
    of this process is guarded by a thread lock of its own)."""

    def __init__(self, directory: Path, lock: StoreLock, max_xml_bytes: int) -> None:
        self.directory = directory
        self._lock = lock
        self._max_xml_bytes = max_xml_bytes
        self._mu = threading.RLock()
        self._writers = 0  # changes of this process under way (it holds the store lock)
        self._odd: tuple[int, float] | None = None  # an odd generation, first seen when
        self._index = _Index()
        # (generation, directory inode, directory mtime_ns) the index is current for
        self._seen: DirState | None = None

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
        """All readable definitions, re-reading only files that changed."""
        with self._mu:
            self._refresh()
            return tuple(self._index.by_uuid.values())

    def uuids(self) -> frozenset[str]:
        with self._mu:
            self._refresh()
            return frozenset(self._index.by_uuid)

    def find(self, key: str) -> DomainDef | None:
        """By name, else by UUID (any case, with or without dashes)."""
        with self._mu:
            self._refresh()
            return self._index.find(key)

    def check_clash(self, name: str, uuid: str) -> bool:
        """libvirt's virDomainObjListAdd clash rules against what is defined now; True if
        (name, uuid) is defined (call with the store lock held to act on the answer)."""
        with self._mu:
            self._refresh()
            return self._index.check_clash(name, uuid)

    def _refresh(self) -> None:
        """Bring the index up to date (``_mu`` held)."""
        generation = self._lock.read_generation()
        seen = self._seen
        if generation % 2 and seen is not None and self._in_flight(generation):
            return  # a change under way: the view from just before it stands
        with storage_errors("list", self.directory):
            dst = os.stat(self.directory)
        now = (generation, dst.st_ino, dst.st_mtime_ns)
        if seen is not None and generation % 2 == 0:
            if seen == now:
                return
            changed = self._lock.changes_since(seen, now)
            if changed is not None and all(_plain_name(n) for n in changed):
                with storage_errors("list", self.directory):
                    for file_name in changed:
                        self._restat(file_name)
                # A writer at work meanwhile: its files may or may not be seen yet, so the
                # view stays at ``seen`` and the next look asks the log again.
                if self._lock.read_generation() == generation:
                    self._seen = now
                return
        with storage_errors("list", self.directory):
            self._index = _Index(self._rescan())
        # Reusable only if no store writer was at work before or during the scan.
        if generation % 2 == 0 and self._lock.read_generation() == generation:
            self._seen = now
        else:
            self._seen = None

    def _in_flight(self, generation: int) -> bool:
        """Is the change that made the generation odd still under way (rather than left
        half-done by a writer that died)? This process's own is (it holds the store lock);
        another process's is if this thread does not hold the store lock (it would get it
        only once that writer was gone) and the generation turned odd less than
        ODD_GRACE seconds ago (a live writer takes milliseconds)."""
        if self._writers:
            return True
        if self._lock.held_here():
            return False
        now = time.monotonic()
        if self._odd is None or self._odd[0] != generation:
            self._odd = (generation, now)
        return now - self._odd[1] < ODD_GRACE

    def _restat(self, file_name: str) -> None:
        """Look at one file again (the log named it)."""
        path = os.path.join(self.directory, file_name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            self._index.drop(file_name)
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._index.files.get(file_name)
        if hit is not None and hit[0] == key:
            return
        if not stat.S_ISREG(st.st_mode):
            report_unreadable(path, "not a regular file")
            self._index.put(file_name, (key, None))
        elif (loaded := self._load(path, file_name, key)) is not None:
            self._index.put(file_name, loaded)
        else:
            self._index.drop(file_name)

    def _rescan(self) -> dict[str, _Cached]:
        old = self._index.files
        new: dict[str, _Cached] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if not _plain_name(name):
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

    @contextlib.contextmanager
    def _changing(self, *file_names: str) -> Iterator[None]:
        """A change of these files (store lock held), logged for the other readers; this
        process's view takes in its own change the same way (no file is parsed again:
        the writer puts what it wrote in the index first). The view's own lock is not
        held across the file operations (an fsync): a reader of this process meanwhile
        gets the view as it was before the change, or with it."""
        with self._mu:
            self._refresh()
            self._writers += 1
        try:
            with self._lock.changing(self.directory, file_names):
                yield
        finally:
            with self._mu:
                self._writers -= 1
                self._refresh()

    def write(self, d: DomainDef) -> None:
        """Write one definition; the caller holds the store lock (and checked clashes)."""
        path = self.path(d.uuid)
        with self._changing(path.name):
            atomic_write(path, d.xml.encode("utf-8"), mtime_ns=time.time_ns())
            with contextlib.suppress(OSError):
                st = os.stat(path)
                with self._mu:
                    self._index.put(path.name, ((st.st_ino, st.st_mtime_ns, st.st_size), d))

    def write_many(
        self, ds: Sequence[DomainDef], after_rename: Callable[[int], None] | None = None
    ) -> None:
        """Write several definitions with one flush (durable.atomic_write_many; group
        commit); the caller holds the store lock (and checked clashes). All or none on
        failure. ``after_rename(i)`` runs after the i-th rename (a failpoint)."""
        paths = [self.path(d.uuid) for d in ds]
        items = [(p, d.xml.encode("utf-8"), time.time_ns()) for p, d in zip(paths, ds, strict=True)]
        with self._changing(*(p.name for p in paths)):
            atomic_write_many(items, after_rename=after_rename)
            for path, d in zip(paths, ds, strict=True):
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    with self._mu:
                        self._index.put(path.name, ((st.st_ino, st.st_mtime_ns, st.st_size), d))

    def remove_many(self, uuids: Sequence[str]) -> None:
        """Remove several definitions (canonical UUIDs) with one directory flush; the
        caller holds the store lock."""
        if len(uuids) == 1:
            self.remove(uuids[0])
            return
        paths = [self.path(u) for u in uuids]
        with self._changing(*(p.name for p in paths)), storage_errors("remove", self.directory):
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                with self._mu:
                    self._index.drop(path.name)
            fsync_dir(self.directory)

    def remove(self, uuid: str) -> None:
        """Remove the definition of ``uuid`` (canonical); the caller holds the store
        lock."""
        path = self.path(uuid)
        with self._changing(path.name):
            durable_unlink(path)
            with self._mu:
                self._index.drop(path.name)


def _plain_name(file_name: str) -> bool:
    """A definition's file name (not a temp file; no path: the log's names are checked
    too)."""
    return (
        file_name.endswith(".xml")
        and not file_name.startswith(TEMP_PREFIX)
        and "/" not in file_name
    )
