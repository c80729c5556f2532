"""The host store: identity, persistent domain definitions, migration jobs (see
docs/ARCHITECTURE.md). :class:`HostStore` composes one module per job:

    STATE_DIR/
      host.json               host identity              common.hostid
      domains/<uuid>.xml      persistent definitions     common.definitions
      jobs/<migration_id>.json  the job journal          common.journal
                              (a destination record is the incoming reservation:
                              common.reservations)
      outcomes/<migration_id>.json  how incoming migrations ended   common.outcomes
      locks/store.lock        the store-wide lock        common.storelock
      locks/<uuid>.job        source migration job locks common.joblock

One store per host state directory, shared by the host's two daemons (srcd and dstd, two
processes) and used from many threads in each (asyncio handlers call these blocking
methods through ``asyncio.to_thread``). Every write goes through
:func:`common.durable.atomic_write` (a file is always either its old or its new version),
and every OSError becomes a StorageError in :func:`common.durable.storage_errors`.
Mutations and check-then-act sequences run under the store lock; reads take none.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from vmmigrate.common.definitions import Definitions
from vmmigrate.common.domainxml import DEFAULT_MAX_XML_BYTES, DomainDef
from vmmigrate.common.durable import clean_temp_files, storage_errors
from vmmigrate.common.errors import JobActive, NoDomain, OperationInvalid
from vmmigrate.common.hostid import (
    HOST_FILE,
    HostIdentity,
    host_uuid_override,
    load_or_create_host_uuid,
)
from vmmigrate.common.joblock import JobLock, JobLocks, job_busy
from vmmigrate.common.journal import (
    JobRecord,
    Journal,
    Role,
    role_of,
    validate_migration_id,
)
from vmmigrate.common.outcomes import MigrationOutcome, Outcome, Outcomes
from vmmigrate.common.reservations import Reservations
from vmmigrate.common.storelock import StoreLock
from vmmigrate.common.uuids import canonical_uuid_or_none, require_uuid

if TYPE_CHECKING:
    from vmmigrate.common.config import DaemonConfig

__all__ = [
    "OUTCOMES",
    "OUTCOME_CANCELLED",
    "OUTCOME_FINISHED",
    "ROLES",
    "ROLE_DESTINATION",
    "ROLE_SOURCE",
    "HostIdentity",
    "HostStore",
    "JobLock",
    "JobRecord",
    "MigrationOutcome",
    "Outcome",
    "Role",
    "validate_migration_id",
]

log = structlog.get_logger("vmmigrate.store")

# The names callers used before the enums; the members compare equal to the strings.
ROLE_SOURCE = Role.SOURCE
ROLE_DESTINATION = Role.DESTINATION
ROLES = tuple(Role)
OUTCOME_FINISHED = Outcome.FINISHED
OUTCOME_CANCELLED = Outcome.CANCELLED
OUTCOMES = tuple(Outcome)


def _not_found(key: str) -> NoDomain:
    what = "uuid" if canonical_uuid_or_none(key) is not None else "name"
    return NoDomain(f"Domain not found: no domain with matching {what} '{key}'")


class HostStore:
    """The host state directory of one host. Thread-safe and multi-process-safe."""

    @classmethod
    def for_daemon(cls, config: DaemonConfig) -> HostStore:
        """The store as a daemon's configuration names it (srcd and dstd alike)."""
        return cls(
            config.state_dir,
            host_uuid=config.host_uuid,
            hostname=config.hostname,
            max_xml_bytes=config.max_xml_bytes,
        )

    def __init__(
        self,
        state_dir: Path,
        *,
        host_uuid: str | None = None,
        hostname: str | None = None,
        max_xml_bytes: int = DEFAULT_MAX_XML_BYTES,
    ) -> None:
        self.state_dir = Path(state_dir)
        override = None if host_uuid is None else host_uuid_override(host_uuid)
        dirs = [self.state_dir / d for d in ("", "domains", "jobs", "outcomes", "locks")]
        for d in dirs:
            with storage_errors("create", d):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = StoreLock(self.state_dir / "locks" / "store.lock", self.state_dir)
        self._defs = Definitions(self.state_dir / "domains", self._lock, max_xml_bytes)
        self._journal = Journal(self.state_dir / "jobs")
        self._outcomes = Outcomes(self.state_dir / "outcomes")
        self._jobs = JobLocks(self.state_dir / "locks", self._lock)
        self._incoming = Reservations(self._lock, self._journal, self._defs, self._jobs)
        with self._lock.held():
            self._lock.init_generation()
            if self._lock.read_generation() % 2:
                # Odd with the store lock held: a writer died half-way through a change of
                # domains/ (e.g. a group commit cut between its renames). Close it as a
                # change of unknown files, so that the other daemon's view re-reads the
                # directory now rather than after its grace for a live writer.
                with self._lock.changing(self.state_dir / "domains"):
                    log.warning("store_change_left_half_done")
            for d in dirs[:4]:
                n = clean_temp_files(d)
                if n:
                    log.info("store_temp_files_removed", directory=str(d), count=n)
            # The host UUID is created under the store lock: srcd and dstd starting together
            # for the first time must not each invent one.
            persisted = (
                load_or_create_host_uuid(self.state_dir / HOST_FILE) if override is None else None
            )
        self.identity = HostIdentity(
            host_uuid=override or persisted or "",
            hostname=hostname if hostname is not None else socket.gethostname(),
        )

    def close(self) -> None:
        """Release this store's job locks and close the store lock. Idempotent."""
        self._jobs.release_all()
        self._lock.close()

    # ------------------------------------------------------------------ definitions

    def list_domains(self) -> list[DomainDef]:
        """Every persistent definition, sorted by name."""
        return sorted(self._defs.scan(), key=lambda d: d.name)

    def find(self, key: str) -> DomainDef | None:
        """By name, else by UUID (any case, with or without dashes)."""
        return self._defs.find(key)

    def lookup(self, key: str) -> DomainDef:
        d = self.find(key)
        if d is None:
            raise _not_found(key)
        return d

    def define(self, d: DomainDef) -> bool:
        """Persist a definition; True if it replaced one with the same name and UUID."""
        parsed = self._defs.validated(d)
        with self._lock.held():
            replaced = self._defs.check_clash(parsed.name, parsed.uuid)
            incoming = self._incoming.holder(parsed.name, parsed.uuid)
            if incoming is not None:
                raise JobActive(f"domain '{incoming.domain_name}' is being migrated to this host")
            if self._jobs.held_locked(parsed.uuid):
                raise job_busy(parsed.name)
            self._defs.write(parsed)
        log.info("domain_defined", name=parsed.name, uuid=parsed.uuid, replaced=replaced)
        return replaced

    def undefine(self, key: str, job: JobLock | None = None) -> DomainDef:
        """Remove a definition (by name or UUID); returns what was removed.

        Refused while a migration job holds the domain, unless ``job`` is that job's own
        lock, held by the caller (Confirm with UNDEFINE_SOURCE runs inside the job).
        """
        got = self.undefine_many([(key, job)])[0]
        if isinstance(got, Exception):
            raise got
        return got

    def _undefinable(self, key: str, job: JobLock | None, gone: set[str]) -> DomainDef:
        """undefine's checks (store lock held): the definition to remove, or the error
        (``gone``: the UUIDs this group removes already)."""
        d = self._defs.find(key)
        if d is None or d.uuid in gone:
            raise _not_found(key)
        own_job = job is not None and job.owned_by(self._jobs) and job.uuid == d.uuid
        # An incoming migration that will replace this definition counts as a running
        # job too (libvirt holds the MIGRATION_IN job on the same domain object).
        if (not own_job and self._jobs.held_locked(d.uuid)) or self._incoming.holder(
            d.name, d.uuid
        ):
            raise JobActive(f"cannot undefine domain '{d.name}': a migration job is running")
        return d

    def undefine_many(
        self, items: Sequence[tuple[str, JobLock | None]]
    ) -> list[DomainDef | Exception]:
        """:meth:`undefine` of several (key, job) with one directory flush covering them
        all (group commit: Confirms of concurrent migrations); per item what was removed,
        or that item's error (a failed removal is every removed item's)."""
        results: list[DomainDef | Exception] = []
        with self._lock.held():
            gone: set[str] = set()
            for key, job in items:
                try:
                    d = self._undefinable(key, job, gone)
                except Exception as exc:
                    results.append(exc)
                    continue
                gone.add(d.uuid)
                results.append(d)
            if gone:
                try:
                    self._defs.remove_many(sorted(gone))
                except Exception as exc:
                    return [r if isinstance(r, Exception) else exc for r in results]
        removed = [r for r in results if not isinstance(r, Exception)]
        if len(removed) == 1:
            log.info("domain_undefined", name=removed[0].name, uuid=removed[0].uuid)
        elif removed:  # a group commit: one line for the group (logging is per-domain CPU)
            log.info(
                "domains_undefined",
                count=len(removed),
                names=[r.name for r in removed],
                uuids=[r.uuid for r in removed],
            )
        return results

    # ------------------------------------------------------------------ source job lock

    def acquire_job(self, d: DomainDef) -> JobLock:
        """Take the source migration job on ``d``, without waiting."""
        uuid = require_uuid(d.uuid, "domain uuid")
        with self._lock.held():
            # The destination holds its incoming job from Prepare to Finish: a domain that
            # is about to be replaced by an incoming migration cannot be sent away.
            if self._incoming.holder(None, uuid) is not None:
                raise job_busy(d.name)
            lock = self._jobs.acquire_locked(uuid, d.name)
        log.debug("job_acquired", name=d.name, uuid=uuid)
        return lock

    def sweep_job_locks(self, keep: frozenset[str] = frozenset()) -> int:
        """Remove the job lock files no job holds, of domains not defined here and not in
        ``keep`` (the running ones); returns how many went (common/joblock.py)."""
        self._defs.uuids()  # a first full scan (10,000 parses) not under the store lock
        with self._lock.held():
            defined = self._defs.uuids()
            removed = self._jobs.sweep(defined | keep)
        if removed:
            log.debug("job_locks_swept", count=removed)
        return removed

    def job_held(self, uuid: str) -> bool:
        """Is a source migration job held on this domain, in any process?"""
        u = require_uuid(uuid, "domain uuid")
        with self._lock.held():
            return self._jobs.held_locked(u)

    # ------------------------------------------------------------------ incoming migrations

    def reserve_incoming(self, rec: JobRecord) -> bool:
        """Reserve ``rec``'s name and UUID for an incoming migration (Prepare).

        Returns True if a definition with the same name and UUID exists (Finish will
        replace it). Retrying with the same migration id, name and UUID rewrites the record.
        """
        return self._incoming.reserve(rec)

    def persist_incoming(self, migration_id: str, d: DomainDef) -> bool:
        """Write the incoming definition (Finish); True if it replaced one.

        The reservation stays: the caller removes it with :meth:`journal_remove` (or
        :meth:`release_incoming`) once Finish has answered.
        """
        return self._incoming.persist(migration_id, d)

    def persist_incoming_many(
        self,
        items: Sequence[tuple[str, DomainDef]],
        after_rename: Callable[[int], None] | None = None,
    ) -> list[tuple[DomainDef | None, bool] | Exception]:
        """:meth:`persist_incoming` for several (migration id, definition), with one flush
        covering all (group commit); per item: (the definition it replaced, or None;
        whether it replaced one), or that item's error."""
        return self._incoming.persist_many(items, after_rename)

    def unpersist_incoming(self, migration_id: str, previous: DomainDef | None) -> None:
        """Undo :meth:`persist_incoming` of a Finish that failed afterwards: put back the
        definition it replaced, or remove the one it added (the reservation still holds)."""
        self._incoming.unpersist(migration_id, previous)

    def release_incoming(self, migration_id: str) -> None:
        """Drop an incoming reservation; no error if there is none."""
        self._incoming.release(migration_id)

    # ------------------------------------------------------------------ journal

    def journal_put(self, rec: JobRecord, *, durable: bool = True) -> None:
        """Write (or rewrite) a journal record (durably unless told otherwise).

        The store stamps ``pid`` with the writing process, and fills ``started_unix`` /
        ``updated_unix`` when they are 0. A record may not change role.
        """
        validate_migration_id(rec.migration_id)
        role = role_of(rec.role)
        with self._lock.held():
            old = self._journal.read(rec.migration_id)
            if old is not None and old.role != role:
                raise OperationInvalid(
                    f"migration id '{rec.migration_id}' is already in use by a {old.role} "
                    f"job for domain '{old.domain_name}'"
                )
            rec = dataclasses.replace(rec, role=role)
            if role == Role.DESTINATION:  # a source record changes no reservation
                with self._incoming.index.changing(rec.migration_id, rec):
                    self._journal.write(rec, durable=durable)
            else:
                self._journal.write(rec, durable=durable)

    def journal_get(self, migration_id: str) -> JobRecord | None:
        validate_migration_id(migration_id)
        return self._journal.read(migration_id)

    def journal_list(self, role: Role | str | None = None) -> list[JobRecord]:
        """Records in the journal (of one role), oldest first."""
        records = [r for r in self._journal.read_all() if role is None or r.role == role]
        return sorted(records, key=lambda r: (r.started_unix, r.migration_id))

    def journal_remove(self, migration_id: str, *, durable: bool = True) -> None:
        """Remove a record (durably unless told otherwise); no error if absent.

        A finished job's record need not go durably: if it comes back after a crash,
        recovery finds the job already complete and drops it again."""
        validate_migration_id(migration_id)
        with self._lock.held(), self._incoming.index.changing(migration_id, None):
            self._journal.remove(migration_id, durable=durable)

    # ------------------------------------------------------------------ outcomes

    def outcome_put(self, outcome: MigrationOutcome, *, durable: bool = True) -> None:
        """Remember how an incoming migration ended (before Finish answers).

        A finished outcome is written durably: a restarted dstd must give the same answer.
        A cancelled one need not be: an unknown migration id is answered as cancelled."""
        validate_migration_id(outcome.migration_id)
        self._outcomes.put(outcome, durable=durable)

    def outcome_put_many(self, outcomes: Sequence[MigrationOutcome]) -> list[Exception | None]:
        """:meth:`outcome_put` (durable) of several outcomes with one flush; per item None,
        or its error (a failed flush is every item's)."""
        results: list[Exception | None] = []
        good: list[MigrationOutcome] = []
        for o in outcomes:
            try:
                validate_migration_id(o.migration_id)
            except Exception as exc:
                results.append(exc)
                continue
            results.append(None)
            good.append(o)
        if good:
            try:
                self._outcomes.put_many(good)
            except Exception as exc:
                return [r if r is not None else exc for r in results]
        return results

    def outcome_get(self, migration_id: str) -> MigrationOutcome | None:
        validate_migration_id(migration_id)
        return self._outcomes.get(migration_id)

    def outcomes_expire(self, max_age: float) -> int:
        """Forget outcomes older than ``max_age`` seconds (by file mtime); returns how many."""
        return self._outcomes.expire(max_age)
