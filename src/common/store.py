"""The host store: identity, persistent domain definitions, migration jobs (DESIGN.md 2).

One store per host state directory, shared by the host's two daemons (srcd and dstd, two
processes) and used from many threads in each (asyncio handlers call these blocking
methods through ``asyncio.to_thread``). Layout::

    STATE_DIR/
      host.json               host identity (host UUID), created once, atomically
      domains/<uuid>.xml      one persistent definition per domain, named by its canonical
                              UUID so that no domain name, however hostile, names a path
      jobs/<migration_id>.json  the job journal: one record per migration in flight, on
                              either role; a destination record IS the reservation of the
                              incoming name + UUID (it never creates a definition)
      outcomes/<migration_id>.json  destination: how each incoming migration ended
                              ("finished" or "cancelled"), kept for a while so that a
                              source that lost Finish's answer, or restarted, can ask again
                              (a restarted dstd answers the same)
      locks/store.lock        the store-wide lock (see below)
      locks/<uuid>.job        the per-domain source migration job lock

Every write goes through :func:`common.durable.atomic_write` (temp file, fsync, rename,
fsync of the directory): a file is always either its old or its new version.

Locking:

* **Store lock** (``locks/store.lock``, ``flock(LOCK_EX)``, blocking, plus a
  ``threading.Lock`` because threads of one process share the open file): held by every
  mutation of ``domains/`` and ``jobs/``, by every check-then-act (conflict checks read the
  current state under it), by job-lock acquisition and release, and by the start-up cleanup
  of leftover temp files (which must not race with a write in progress). It is held for a
  scan of ``domains/`` and one or two fsyncs, never across an RPC.
* **Job lock** (``locks/<uuid>.job``, ``flock(LOCK_EX | LOCK_NB)``): the source role's
  migration job on one domain, held from Begin to Confirm (libvirt's async job
  MIGRATION_OUT). flock conflicts between two ``open()`` calls even inside one process, so
  the lock excludes other threads, other :class:`HostStore` instances and the other daemon
  alike, and the kernel drops it when its holder dies. Whether a job is held is probed, under
  the store lock, by trying the lock; since acquisition also runs under the store lock, a
  probe can never make an acquisition fail.
* **Reads** (list, find, journal reads) take no lock: files are only ever replaced by
  rename, so a reader sees whole files.

Listing costs one stat per file, not one parse: parsed definitions are cached per file,
keyed by (inode, mtime_ns, size). Inodes are reused as soon as they are freed, so every
write stamps the file with a fresh nanosecond mtime under the store lock: two versions of
one file never share a key. On top of that, a whole listing is reused while nothing has
changed: every change of ``domains/`` is bracketed, under the store lock, by a generation
counter kept in the first 8 bytes of ``locks/store.lock`` (odd while a change is under way,
so a writer that dies half-way leaves every reader re-scanning, never trusting). A listing
is reused only if the generation is even and unchanged and so is the directory's (inode,
mtime), which also catches files dropped in by hand. The counter needs no durability: caches
do not outlive the processes that share it.

Not fork-safe beyond the basics: a forked child reopens the store lock, but should make its
own store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import socket
import stat
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from vmmigrate.common.domainxml import (
    DEFAULT_MAX_XML_BYTES,
    DomainDef,
    canonical_uuid,
    parse_domain,
    validate_name,
)
from vmmigrate.common.durable import (
    TEMP_PREFIX,
    atomic_write,
    clean_temp_files,
    durable_unlink,
    storage_error,
)
from vmmigrate.common.errors import (
    DomainExists,
    InvalidArgument,
    JobActive,
    NoDomain,
    OperationInvalid,
    StorageError,
)

log = structlog.get_logger("vmmigrate.store")

ROLE_SOURCE = "source"
ROLE_DESTINATION = "destination"
ROLES = (ROLE_SOURCE, ROLE_DESTINATION)

_MIGRATION_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
_MAX_MIGRATION_ID = 128
_HOST_FILE = "host.json"


@dataclass(frozen=True)
class HostIdentity:
    host_uuid: str  # canonical lowercase 8-4-4-4-12, sent as the cookie's <hostuuid>
    hostname: str


@dataclass(frozen=True)
class JobRecord:
    """One migration in flight, as the job journal keeps it (rewritten at each phase)."""

    migration_id: str
    role: str  # ROLE_SOURCE | ROLE_DESTINATION
    domain_name: str
    domain_uuid: str
    phase: str  # a Phase label, e.g. "begin3", "prepare", "finish3"
    flags: int
    peer: str  # the other host's address
    xml: str = ""  # destination: the definition to persist at Finish
    dest_name: str = ""
    started_unix: float = 0.0
    updated_unix: float = 0.0
    pid: int = 0  # process that wrote it (stamped by the store)
    was_running: bool = False  # source, live: was the domain running at Begin
    source_name: str = ""  # destination: the domain's name on the source

    def with_phase(self, phase: str) -> JobRecord:
        return dataclasses.replace(self, phase=phase, updated_unix=time.time())


_RECORD_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}

OUTCOME_FINISHED = "finished"
OUTCOME_CANCELLED = "cancelled"
OUTCOMES = (OUTCOME_FINISHED, OUTCOME_CANCELLED)


@dataclass(frozen=True)
class MigrationOutcome:
    """How an incoming migration ended on the destination (what its Finish answered)."""

    migration_id: str
    outcome: str  # OUTCOME_FINISHED | OUTCOME_CANCELLED
    domain_name: str = ""  # finished: the domain's name here, and the source's name
    domain_uuid: str = ""
    origname: str = ""
    active: bool = False  # finished live: the domain runs here
    ended_unix: float = 0.0


def _record_to_bytes(rec: JobRecord) -> bytes:
    return json.dumps(dataclasses.asdict(rec), sort_keys=True).encode("utf-8")


def _record_from_bytes(data: bytes) -> JobRecord:
    """Parse one journal file; ValueError if it is not a well-formed record."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(JobRecord):
        if f.name not in obj:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"missing field {f.name!r}")
            continue
        value = obj[f.name]
        want = _RECORD_TYPES[str(f.type)]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ValueError(f"field {f.name!r} is not a {want.__name__}")
        values[f.name] = value
    return JobRecord(**values)


def validate_migration_id(mid: str) -> None:
    """A migration id names a journal file: 1-128 of [A-Za-z0-9._:-], no leading '.'."""
    if not isinstance(mid, str) or not 1 <= len(mid) <= _MAX_MIGRATION_ID:
        raise InvalidArgument(
            f"invalid migration id {mid!r}: must be 1 to {_MAX_MIGRATION_ID} characters"
        )
    if not _MIGRATION_ID_RE.fullmatch(mid):
        raise InvalidArgument(
            f"invalid migration id {mid!r}: only letters, digits and '.', '_', ':', '-' are allowed"
        )
    if mid.startswith("."):
        raise InvalidArgument(f"invalid migration id {mid!r}: must not start with '.'")


def _canonical_uuid_or_none(text: str) -> str | None:
    try:
        return canonical_uuid(text)
    except InvalidArgument:
        return None


def _require_uuid(text: str, what: str) -> str:
    u = _canonical_uuid_or_none(text)
    if u is None:
        raise InvalidArgument(f"invalid {what} {text!r}")
    return u


def _host_uuid_valid(u: str) -> bool:
    # libvirt's virUUIDIsValid: a UUID made of one repeated hex digit (all zeros, all 'f',
    # typical of broken SMBIOS tables) does not identify a host.
    return len(set(u.replace("-", ""))) > 1


def _same_uuid(a: str, b: str) -> bool:
    return (_canonical_uuid_or_none(a) or a) == (_canonical_uuid_or_none(b) or b)


_StatKey = tuple[int, int, int]
_SnapKey = tuple[int, int, int]  # (generation, directory inode, directory mtime_ns)


class JobLock:
    """A held source-side migration job on one domain (``locks/<uuid>.job``).

    Release it exactly when the job ends (Confirm, or a failed Begin/Perform); release is
    idempotent. Also a context manager. If the process dies, the kernel drops the lock.
    """

    def __init__(self, store: HostStore, uuid: str, name: str, fd: int, path: Path) -> None:
        self._store = store
        self.uuid = uuid
        self.name = name
        self._fd: int | None = fd
        self._path = path

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        self._store._release_job(self)

    def _drop(self) -> None:
        """Unlink the lock file and unlock; the caller holds the store lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink before unlocking, under the store lock, so that nobody can open this
            # inode between the two and then lock a file that no longer has a name.
            with contextlib.suppress(OSError):
                if os.stat(self._path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self._path)
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


class HostStore:
    """The host state directory of one host. Thread-safe and multi-process-safe."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host_uuid: str | None = None,
        hostname: str | None = None,
        max_xml_bytes: int = DEFAULT_MAX_XML_BYTES,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._domains = self.state_dir / "domains"
        self._jobs = self.state_dir / "jobs"
        self._outcomes = self.state_dir / "outcomes"
        self._locks = self.state_dir / "locks"
        self._max_xml_bytes = max_xml_bytes
        override = None
        if host_uuid is not None:
            override = _require_uuid(host_uuid, "host uuid")
            if not _host_uuid_valid(override):
                raise InvalidArgument(f"invalid host uuid {host_uuid!r}")
        try:
            for d in (self.state_dir, self._domains, self._jobs, self._outcomes, self._locks):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.state_dir}: {exc.strerror}") from exc
        self._tlock = threading.Lock()
        self._pid = os.getpid()
        self._lock_fd = self._open_store_lock()
        self._held: dict[str, JobLock] = {}
        # file name in domains/ -> (stat key, parsed definition or None if unreadable)
        self._cache: dict[str, tuple[_StatKey, DomainDef | None]] = {}
        # the whole of domains/ as of one _SnapKey, see _scan()
        self._snapshot: tuple[_SnapKey, tuple[DomainDef, ...]] | None = None
        with self._locked():
            if len(os.pread(self._lock_fd, 8, 0)) != 8:
                self._write_generation(0)
            for d in (self.state_dir, self._domains, self._jobs, self._outcomes):
                n = clean_temp_files(d)
                if n:
                    log.info("store_temp_files_removed", directory=str(d), count=n)
            # The host UUID is created under the store lock: srcd and dstd starting together
            # for the first time must not each invent one.
            persisted = self._load_or_create_host_uuid() if override is None else None
        self.identity = HostIdentity(
            host_uuid=override or persisted or "",
            hostname=hostname if hostname is not None else socket.gethostname(),
        )

    # ------------------------------------------------------------------ plumbing

    def _open_store_lock(self) -> int:
        path = self._locks / "store.lock"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}") from exc

    def _check_fork(self) -> None:
        # After fork() the child shares the parent's open file description, and so its
        # flock: it must open its own. A lock held by another thread at fork time would
        # never be released in the child, so the thread lock is replaced too.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._tlock = threading.Lock()
            self._held = {}
            if self._lock_fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = self._open_store_lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The store lock: this process's threads, then the other processes."""
        self._check_fork()
        with self._tlock:
            fd = self._lock_fd
            if fd < 0:
                raise StorageError(f"the store at {self.state_dir} is closed")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                path = self._locks / "store.lock"
                raise StorageError(f"cannot lock {path}: {exc.strerror}") from exc
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release this store's job locks and close the store lock. Idempotent."""
        for lock in list(self._held.values()):
            lock.release()
        with self._tlock:
            fd, self._lock_fd = self._lock_fd, -1
            if fd >= 0:
                os.close(fd)

    def _load_or_create_host_uuid(self) -> str:
        path = self.state_dir / _HOST_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            new = str(uuidlib.uuid4())
            body = {"host_uuid": new, "created_unix": time.time()}
            atomic_write(path, json.dumps(body, sort_keys=True).encode() + b"\n")
            log.info("host_uuid_created", host_uuid=new, path=str(path))
            return new
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        # A host whose identity silently changed would defeat the same-host check: an
        # unreadable host.json is an error, never a reason to invent a new UUID.
        try:
            obj = json.loads(data)
            text = obj["host_uuid"]
            u = canonical_uuid(text) if isinstance(text, str) else None
        except (ValueError, KeyError, TypeError, InvalidArgument):
            u = None
        if u is None or not _host_uuid_valid(u):
            raise StorageError(f"cannot read {path}: no valid host_uuid in it")
        return u

    # ------------------------------------------------------------------ definitions

    def _def_path(self, uuid: str) -> Path:
        # canonical_uuid() output only: hex digits and dashes.
        return self._domains / f"{uuid}.xml"

    def _unreadable(self, path: str, reason: str) -> None:
        log.warning("store_file_unreadable", path=path, reason=reason)

    def _load_def(
        self, path: str, file_name: str, seen: _StatKey
    ) -> tuple[_StatKey, DomainDef | None] | None:
        """Read and parse one definition file; None if it vanished meanwhile.

        ``seen`` is the key the directory scan saw; a file that cannot be read is cached
        under it as unreadable, so that it is reported once, not at every listing.
        """
        try:
            # O_NONBLOCK: a FIFO planted in domains/ must not hang the daemon.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unreadable(path, exc.strerror or str(exc))
            return seen, None
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if not stat.S_ISREG(st.st_mode):
                self._unreadable(path, "not a regular file")
                return key, None
            if st.st_size > self._max_xml_bytes:
                self._unreadable(path, f"larger than {self._max_xml_bytes} bytes")
                return key, None
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        except OSError as exc:
            self._unreadable(path, exc.strerror or str(exc))
            return seen, None
        finally:
            os.close(fd)
        try:
            d = parse_domain(data, max_bytes=self._max_xml_bytes, generate_uuid=False)
        except (InvalidArgument, UnicodeDecodeError) as exc:
            self._unreadable(path, str(exc))
            return key, None
        if file_name != f"{d.uuid}.xml":
            self._unreadable(path, f"holds uuid {d.uuid}, not the one in its file name")
            return key, None
        return key, d

    def _read_generation(self) -> int:
        data = os.pread(self._lock_fd, 8, 0)
        return int.from_bytes(data, "little") if len(data) == 8 else 1

    def _write_generation(self, value: int) -> None:
        try:
            os.pwrite(self._lock_fd, value.to_bytes(8, "little"), 0)
        except OSError as exc:
            path = self._locks / "store.lock"
            raise storage_error("write", path, exc) from exc

    @contextlib.contextmanager
    def _changing_domains(self) -> Iterator[None]:
        """Bracket a change of ``domains/`` (store lock held): the generation is odd inside."""
        g = self._read_generation()
        self._write_generation(g + 1 if g % 2 == 0 else g + 2)
        try:
            yield
        finally:
            try:
                self._write_generation(self._read_generation() + 1)
            except StorageError as exc:
                # Left odd: every reader keeps re-scanning, which is slow but right.
                log.warning("store_generation_unwritten", error=str(exc))

    def _remember(self, defs: Sequence[DomainDef]) -> None:
        """Record the exact content of ``domains/`` after our own change (store lock held)."""
        g = self._read_generation()
        if g % 2:
            self._snapshot = None
            return
        dst = os.stat(self._domains)
        self._snapshot = ((g, dst.st_ino, dst.st_mtime_ns), tuple(defs))

    def _scan(self) -> Sequence[DomainDef]:
        """All readable definitions, re-parsing only files that changed."""
        generation = self._read_generation()
        try:
            dst = os.stat(self._domains)
        except OSError as exc:
            raise StorageError(f"cannot list {self._domains}: {exc.strerror}") from exc
        snap_key = (generation, dst.st_ino, dst.st_mtime_ns)
        snap = self._snapshot
        if snap is not None and snap[0] == snap_key and generation % 2 == 0:
            return snap[1]
        old = self._cache
        new: dict[str, tuple[_StatKey, DomainDef | None]] = {}
        try:
            with os.scandir(self._domains) as entries:
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
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        self._unreadable(entry.path, "not a regular file")
                        new[name] = (key, None)
                        continue
                    loaded = self._load_def(entry.path, name, key)
                    if loaded is not None:
                        new[name] = loaded
        except OSError as exc:
            raise StorageError(f"cannot list {self._domains}: {exc.strerror}") from exc
        self._cache = new
        defs = tuple(d for _, d in new.values() if d is not None)
        # Reusable only if no store writer was at work before or during the scan.
        if generation % 2 == 0 and self._read_generation() == generation:
            self._snapshot = (snap_key, defs)
        else:
            self._snapshot = None
        return defs

    @staticmethod
    def _find_in(defs: Sequence[DomainDef], key: str) -> DomainDef | None:
        for d in defs:
            if d.name == key:
                return d
        u = _canonical_uuid_or_none(key)
        if u is not None:
            for d in defs:
                if d.uuid == u:
                    return d
        return None

    def list_domains(self) -> list[DomainDef]:
        """Every persistent definition, sorted by name."""
        return sorted(self._scan(), key=lambda d: d.name)

    def find(self, key: str) -> DomainDef | None:
        """By name, else by UUID (any case, with or without dashes)."""
        return self._find_in(self._scan(), key)

    def lookup(self, key: str) -> DomainDef:
        d = self.find(key)
        if d is None:
            what = "uuid" if _canonical_uuid_or_none(key) is not None else "name"
            raise NoDomain(f"Domain not found: no domain with matching {what} '{key}'")
        return d

    def _validated(self, d: DomainDef) -> DomainDef:
        """Re-parse ``d.xml`` exactly as a later read of the stored file will."""
        parsed = parse_domain(d.xml, max_bytes=self._max_xml_bytes, generate_uuid=False)
        if parsed.name != d.name or parsed.uuid != d.uuid:
            raise InvalidArgument(
                f"domain definition ({d.name!r}, {d.uuid}) does not match its XML "
                f"({parsed.name!r}, {parsed.uuid})"
            )
        return parsed

    @staticmethod
    def _check_definitions(defs: Sequence[DomainDef], name: str, uuid: str) -> bool:
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

    def _write_def(self, d: DomainDef, before: Sequence[DomainDef]) -> None:
        """Write one definition; the caller holds the store lock and scanned ``before``."""
        path = self._def_path(d.uuid)
        with self._changing_domains():
            atomic_write(path, d.xml.encode("utf-8"), mtime_ns=time.time_ns())
        with contextlib.suppress(OSError):
            st = os.stat(path)
            self._cache[path.name] = ((st.st_ino, st.st_mtime_ns, st.st_size), d)
        self._remember([x for x in before if x.uuid != d.uuid] + [d])

    def define(self, d: DomainDef) -> bool:
        """Persist a definition; True if it replaced one with the same name and UUID."""
        parsed = self._validated(d)
        with self._locked():
            defs = self._scan()
            replaced = self._check_definitions(defs, parsed.name, parsed.uuid)
            incoming = self._reservation_for(parsed.name, parsed.uuid)
            if incoming is not None:
                raise JobActive(f"domain '{incoming.domain_name}' is being migrated to this host")
            if self._job_held_locked(parsed.uuid):
                raise JobActive(
                    f"another migration job is already running for domain '{parsed.name}'"
                )
            self._write_def(parsed, defs)
        log.info("domain_defined", name=parsed.name, uuid=parsed.uuid, replaced=replaced)
        return replaced

    def undefine(self, key: str, job: JobLock | None = None) -> DomainDef:
        """Remove a definition (by name or UUID); returns what was removed.

        Refused while a migration job holds the domain, unless ``job`` is that job's own
        lock, held by the caller (Confirm with UNDEFINE_SOURCE runs inside the job).
        """
        with self._locked():
            defs = self._scan()
            d = self._find_in(defs, key)
            if d is None:
                what = "uuid" if _canonical_uuid_or_none(key) is not None else "name"
                raise NoDomain(f"Domain not found: no domain with matching {what} '{key}'")
            own_job = job is not None and job.held and job._store is self and job.uuid == d.uuid
            # An incoming migration that will replace this definition counts as a running
            # job too (libvirt holds the MIGRATION_IN job on the same domain object).
            if (not own_job and self._job_held_locked(d.uuid)) or self._reservation_for(
                d.name, d.uuid
            ):
                raise JobActive(f"cannot undefine domain '{d.name}': a migration job is running")
            path = self._def_path(d.uuid)
            with self._changing_domains():
                durable_unlink(path)
            self._cache.pop(path.name, None)
            self._remember([x for x in defs if x.uuid != d.uuid])
        log.info("domain_undefined", name=d.name, uuid=d.uuid)
        return d

    # ------------------------------------------------------------------ source job lock

    def _job_path(self, uuid: str) -> Path:
        return self._locks / f"{uuid}.job"

    def _job_held_locked(self, uuid: str) -> bool:
        """Is a source job held on ``uuid``, by anyone? The caller holds the store lock."""
        if uuid in self._held:
            return True
        path = self._job_path(uuid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            # Free: left behind by a holder that died. Tidy it (nobody else can open it
            # now: acquisition runs under the store lock we hold).
            with contextlib.suppress(OSError):
                os.unlink(path)
            return False
        finally:
            os.close(fd)

    def acquire_job(self, d: DomainDef) -> JobLock:
        """Take the source migration job on ``d``, without waiting."""
        uuid = _require_uuid(d.uuid, "domain uuid")
        busy = JobActive(f"another migration job is already running for domain '{d.name}'")
        with self._locked():
            if uuid in self._held:
                raise busy
            # The destination holds its incoming job from Prepare to Finish: a domain that
            # is about to be replaced by an incoming migration cannot be sent away.
            if self._reservation_for(None, uuid) is not None:
                raise busy
            path = self._job_path(uuid)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Paranoia against anyone removing lock files outside the store lock: the
                # lock only counts if the locked inode still has the name.
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    raise BlockingIOError
            except BlockingIOError:
                os.close(fd)
                raise busy from None
            except OSError as exc:
                os.close(fd)
                raise StorageError(f"cannot lock {path}: {exc.strerror}") from exc
            lock = JobLock(self, uuid, d.name, fd, path)
            self._held[uuid] = lock
        log.debug("job_acquired", name=d.name, uuid=uuid)
        return lock

    def _release_job(self, lock: JobLock) -> None:
        with self._locked():
            if not lock.held:
                return
            if self._held.get(lock.uuid) is lock:
                del self._held[lock.uuid]
            lock._drop()
        log.debug("job_released", name=lock.name, uuid=lock.uuid)

    def job_held(self, uuid: str) -> bool:
        """Is a source migration job held on this domain, in any process?"""
        u = _require_uuid(uuid, "domain uuid")
        with self._locked():
            return self._job_held_locked(u)

    # ------------------------------------------------------------------ incoming migrations

    def _reservation_for(
        self, name: str | None, uuid: str, *, ignore: str | None = None
    ) -> JobRecord | None:
        """The incoming migration (other than ``ignore``) that reserved name or uuid."""
        for rec in self._read_journal():
            if rec.role != ROLE_DESTINATION or rec.migration_id == ignore:
                continue
            if rec.domain_name == name or _same_uuid(rec.domain_uuid, uuid):
                return rec
        return None

    def reserve_incoming(self, rec: JobRecord) -> bool:
        """Reserve ``rec``'s name and UUID for an incoming migration (Prepare).

        Returns True if a definition with the same name and UUID exists (Finish will
        replace it). Retrying with the same migration id, name and UUID rewrites the record.
        """
        if rec.role != ROLE_DESTINATION:
            raise InvalidArgument(
                f"an incoming reservation needs role 'destination', not {rec.role!r}"
            )
        validate_migration_id(rec.migration_id)
        validate_name(rec.domain_name)
        uuid = _require_uuid(rec.domain_uuid, "domain uuid")
        name = rec.domain_name
        with self._locked():
            mine = self._journal_read(rec.migration_id)
            if mine is not None and (
                mine.role != ROLE_DESTINATION
                or mine.domain_name != name
                or not _same_uuid(mine.domain_uuid, uuid)
            ):
                raise OperationInvalid(
                    f"migration id '{rec.migration_id}' is already in use by a {mine.role} "
                    f"job for domain '{mine.domain_name}'"
                )
            replaces = self._check_definitions(self._scan(), name, uuid)
            if self._reservation_for(name, uuid, ignore=rec.migration_id) is not None:
                raise JobActive(f"another migration job is already running for domain '{name}'")
            if self._job_held_locked(uuid):
                raise JobActive(f"another migration job is already running for domain '{name}'")
            rec = dataclasses.replace(rec, domain_uuid=uuid)
            if mine is not None and mine.started_unix:
                rec = dataclasses.replace(rec, started_unix=mine.started_unix)
            # Not fsync'd: a reservation lost in a crash was never a definition, and the
            # restarted dstd drops reservations anyway. Both daemons still see it at once.
            self._journal_write(rec, durable=False)
        log.debug(
            "incoming_reserved",
            migration_id=rec.migration_id,
            name=name,
            uuid=uuid,
            replaces=replaces,
        )
        return replaces

    def persist_incoming(self, migration_id: str, d: DomainDef) -> bool:
        """Write the incoming definition (Finish); True if it replaced one.

        The reservation stays: the caller removes it with :meth:`journal_remove` (or
        :meth:`release_incoming`) once Finish has answered.
        """
        validate_migration_id(migration_id)
        parsed = self._validated(d)
        with self._locked():
            rec = self._journal_read(migration_id)
            if rec is None or rec.role != ROLE_DESTINATION:
                raise OperationInvalid(f"no incoming migration with id '{migration_id}'")
            defs = self._scan()
            replaced = self._check_definitions(defs, parsed.name, parsed.uuid)
            if self._reservation_for(parsed.name, parsed.uuid, ignore=migration_id) or (
                self._job_held_locked(parsed.uuid)
            ):
                raise JobActive(
                    f"another migration job is already running for domain '{parsed.name}'"
                )
            self._write_def(parsed, defs)
        log.info(
            "domain_persisted",
            migration_id=migration_id,
            name=parsed.name,
            uuid=parsed.uuid,
            replaced=replaced,
        )
        return replaced

    def unpersist_incoming(self, migration_id: str, previous: DomainDef | None) -> None:
        """Undo :meth:`persist_incoming` of a Finish that failed afterwards: put back the
        definition it replaced, or remove the one it added (the reservation still holds)."""
        validate_migration_id(migration_id)
        with self._locked():
            rec = self._journal_read(migration_id)
            if rec is None or rec.role != ROLE_DESTINATION:
                raise OperationInvalid(f"no incoming migration with id '{migration_id}'")
            defs = self._scan()
            if previous is not None:
                self._write_def(previous, defs)
            else:
                path = self._def_path(_require_uuid(rec.domain_uuid, "domain uuid"))
                with self._changing_domains():
                    durable_unlink(path)
                self._cache.pop(path.name, None)
                self._remember([x for x in defs if not _same_uuid(x.uuid, rec.domain_uuid)])
        log.warning("incoming_persist_undone", migration_id=migration_id)

    def release_incoming(self, migration_id: str) -> None:
        """Drop an incoming reservation; no error if there is none."""
        validate_migration_id(migration_id)
        with self._locked():
            rec = self._journal_read(migration_id)
            if rec is not None and rec.role == ROLE_DESTINATION:
                # a reservation that comes back after a crash is dropped at start-up
                durable_unlink(self._journal_path(migration_id), durable=False)

    # ------------------------------------------------------------------ journal

    def _journal_path(self, migration_id: str) -> Path:
        return self._jobs / f"{migration_id}.json"

    def _journal_read(self, migration_id: str) -> JobRecord | None:
        path = self._journal_path(migration_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unreadable(str(path), exc.strerror or str(exc))
            return None
        return self._journal_parse(path, data)

    def _journal_parse(self, path: Path, data: bytes) -> JobRecord | None:
        try:
            rec = _record_from_bytes(data)
        except (ValueError, TypeError) as exc:
            self._unreadable(str(path), str(exc))
            return None
        if path.name != f"{rec.migration_id}.json":
            self._unreadable(str(path), f"holds migration id {rec.migration_id!r}")
            return None
        return rec

    def _read_journal(self) -> list[JobRecord]:
        records = []
        try:
            with os.scandir(self._jobs) as entries:
                names = [
                    e.name
                    for e in entries
                    if not e.name.startswith(TEMP_PREFIX) and e.name.endswith(".json")
                ]
        except OSError as exc:
            raise StorageError(f"cannot list {self._jobs}: {exc.strerror}") from exc
        for name in names:
            rec = self._journal_read(name[: -len(".json")])
            if rec is not None:
                records.append(rec)
        return records

    def _journal_write(self, rec: JobRecord, *, durable: bool = True) -> None:
        now = time.time()
        started = rec.started_unix or now
        stamped = dataclasses.replace(
            rec, pid=os.getpid(), started_unix=started, updated_unix=rec.updated_unix or now
        )
        atomic_write(
            self._journal_path(rec.migration_id), _record_to_bytes(stamped), durable=durable
        )

    def journal_put(self, rec: JobRecord, *, durable: bool = True) -> None:
        """Write (or rewrite) a journal record (durably unless told otherwise).

        The store stamps ``pid`` with the writing process, and fills ``started_unix`` /
        ``updated_unix`` when they are 0. A record may not change role.
        """
        validate_migration_id(rec.migration_id)
        if rec.role not in ROLES:
            raise InvalidArgument(f"invalid job role {rec.role!r}")
        with self._locked():
            old = self._journal_read(rec.migration_id)
            if old is not None and old.role != rec.role:
                raise OperationInvalid(
                    f"migration id '{rec.migration_id}' is already in use by a {old.role} "
                    f"job for domain '{old.domain_name}'"
                )
            self._journal_write(rec, durable=durable)

    def journal_get(self, migration_id: str) -> JobRecord | None:
        validate_migration_id(migration_id)
        return self._journal_read(migration_id)

    def journal_list(self, role: str | None = None) -> list[JobRecord]:
        """Records in the journal (of one role), oldest first."""
        records = [r for r in self._read_journal() if role is None or r.role == role]
        return sorted(records, key=lambda r: (r.started_unix, r.migration_id))

    def journal_remove(self, migration_id: str, *, durable: bool = True) -> None:
        """Remove a record (durably unless told otherwise); no error if absent.

        A finished job's record need not go durably: if it comes back after a crash,
        recovery finds the job already complete and drops it again."""
        validate_migration_id(migration_id)
        with self._locked():
            durable_unlink(self._journal_path(migration_id), durable=durable)

    # ------------------------------------------------------------------ outcomes

    def _outcome_path(self, migration_id: str) -> Path:
        return self._outcomes / f"{migration_id}.json"

    def outcome_put(self, outcome: MigrationOutcome, *, durable: bool = True) -> None:
        """Remember how an incoming migration ended (before Finish answers).

        A finished outcome is written durably: a restarted dstd must give the same answer.
        A cancelled one need not be: an unknown migration id is answered as cancelled."""
        validate_migration_id(outcome.migration_id)
        if outcome.outcome not in OUTCOMES:
            raise InvalidArgument(f"invalid migration outcome {outcome.outcome!r}")
        stamped = dataclasses.replace(outcome, ended_unix=outcome.ended_unix or time.time())
        data = json.dumps(dataclasses.asdict(stamped), sort_keys=True).encode("utf-8")
        atomic_write(self._outcome_path(outcome.migration_id), data, durable=durable)

    def outcome_get(self, migration_id: str) -> MigrationOutcome | None:
        validate_migration_id(migration_id)
        path = self._outcome_path(migration_id)
        try:
            obj = json.loads(path.read_bytes())
            fields = {f.name for f in dataclasses.fields(MigrationOutcome)}
            if not isinstance(obj, dict) or obj.get("migration_id") != migration_id:
                raise ValueError("not an outcome record for this migration id")
            got = MigrationOutcome(**{k: v for k, v in obj.items() if k in fields})
            if got.outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {got.outcome!r}")
            return got
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            self._unreadable(str(path), str(exc))
            return None

    def outcomes_expire(self, max_age: float) -> int:
        """Forget outcomes older than ``max_age`` seconds (by file mtime); returns how many."""
        cutoff = time.time() - max_age
        count = 0
        try:
            with os.scandir(self._outcomes) as entries:
                old = [e.path for e in entries if e.stat().st_mtime < cutoff]
        except OSError as exc:
            raise StorageError(f"cannot list {self._outcomes}: {exc.strerror}") from exc
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                count += 1
        return count
