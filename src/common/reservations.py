"""Incoming migrations on the destination: the reservation of a domain's name and UUID from
Prepare to Finish, and the definition Finish persists.

A reservation is the destination's journal record (role ``destination``): it never creates
a definition, but while it exists nothing else may define, undefine or send away a domain
with that name or UUID (libvirt holds the MIGRATION_IN job on the domain object). Every
method runs its checks and its write under the store lock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import structlog
from vmmigrate.common.definitions import Definitions
from vmmigrate.common.domainxml import DomainDef, validate_name
from vmmigrate.common.errors import InvalidArgument, OperationInvalid
from vmmigrate.common.incomingindex import IncomingIndex
from vmmigrate.common.joblock import JobLocks, job_busy
from vmmigrate.common.journal import JobRecord, Journal, Role, validate_migration_id
from vmmigrate.common.storelock import StoreLock
from vmmigrate.common.uuids import require_uuid, same_uuid

log = structlog.get_logger("vmmigrate.store")


class Reservations:
    def __init__(
        self, lock: StoreLock, journal: Journal, definitions: Definitions, jobs: JobLocks
    ) -> None:
        self._lock = lock
        self._journal = journal
        self._defs = definitions
        self._jobs = jobs
        self.index = IncomingIndex(lock, journal)  # the reservations, without a scan each time

    def holder(self, name: str | None, uuid: str, *, ignore: str | None = None) -> JobRecord | None:
        """The incoming migration (other than ``ignore``) that reserved name or uuid."""
        if self._lock.held_here():
            return self.index.holder(name, uuid, ignore)
        for rec in self._journal.read_all():
            if rec.role != Role.DESTINATION or rec.migration_id == ignore:
                continue
            if rec.domain_name == name or same_uuid(rec.domain_uuid, uuid):
                return rec
        return None

    def _busy(self, name: str, uuid: str, migration_id: str) -> bool:
        """Does another incoming migration, or a source job, hold the domain?"""
        return self.holder(name, uuid, ignore=migration_id) is not None or (
            self._jobs.held_locked(uuid)
        )

    def _own(self, migration_id: str) -> JobRecord:
        rec = self._journal.read(migration_id)
        if rec is None or rec.role != Role.DESTINATION:
            raise OperationInvalid(f"no incoming migration with id '{migration_id}'")
        return rec

    def reserve(self, rec: JobRecord) -> bool:
        """See :meth:`common.store.HostStore.reserve_incoming`."""
        if rec.role != Role.DESTINATION:
            raise InvalidArgument(
                f"an incoming reservation needs role 'destination', not {rec.role!r}"
            )
        validate_migration_id(rec.migration_id)
        validate_name(rec.domain_name)
        uuid = require_uuid(rec.domain_uuid, "domain uuid")
        name = rec.domain_name
        with self._lock.held():
            mine = self._journal.read(rec.migration_id)
            if mine is not None and (
                mine.role != Role.DESTINATION
                or mine.domain_name != name
                or not same_uuid(mine.domain_uuid, uuid)
            ):
                raise OperationInvalid(
                    f"migration id '{rec.migration_id}' is already in use by a {mine.role} "
                    f"job for domain '{mine.domain_name}'"
                )
            replaces = self._defs.check_clash(name, uuid)
            if self._busy(name, uuid, rec.migration_id):
                raise job_busy(name)
            rec = dataclasses.replace(rec, role=Role.DESTINATION, domain_uuid=uuid)
            if mine is not None and mine.started_unix:
                rec = dataclasses.replace(rec, started_unix=mine.started_unix)
            # Not fsync'd: a reservation lost in a crash was never a definition, and the
            # restarted dstd drops reservations anyway. Both daemons still see it at once.
            with self.index.changing(rec.migration_id, rec):
                self._journal.write(rec, durable=False)
        log.debug(
            "incoming_reserved",
            migration_id=rec.migration_id,
            name=name,
            uuid=uuid,
            replaces=replaces,
        )
        return replaces

    def persist(self, migration_id: str, d: DomainDef) -> bool:
        """See :meth:`common.store.HostStore.persist_incoming`."""
        validate_migration_id(migration_id)
        parsed = self._defs.validated(d)
        with self._lock.held():
            self._own(migration_id)
            replaced = self._defs.check_clash(parsed.name, parsed.uuid)
            if self._busy(parsed.name, parsed.uuid, migration_id):
                raise job_busy(parsed.name)
            self._defs.write(parsed)
        log.info(
            "domain_persisted",
            migration_id=migration_id,
            name=parsed.name,
            uuid=parsed.uuid,
            replaced=replaced,
        )
        return replaced

    def persist_many(
        self,
        items: Sequence[tuple[str, DomainDef]],
        after_rename: Callable[[int], None] | None = None,
    ) -> list[tuple[DomainDef | None, bool] | Exception]:
        """:meth:`persist` of several incoming definitions, checked one by one as
        :meth:`persist` checks (an item refused is that item's error only), written with
        one flush (group commit). Per item: (the definition it replaced or None, replaced)."""
        results: list[tuple[DomainDef | None, bool] | Exception] = []
        todo: list[tuple[int, DomainDef, str]] = []
        with self._lock.held():
            for i, (migration_id, d) in enumerate(items):
                try:
                    validate_migration_id(migration_id)
                    parsed = self._defs.validated(d)
                    self._own(migration_id)
                    previous = self._defs.find(parsed.uuid)
                    replaced = self._defs.check_clash(parsed.name, parsed.uuid)
                    if self._busy(parsed.name, parsed.uuid, migration_id) or any(
                        t.uuid == parsed.uuid or t.name == parsed.name for _, t, _ in todo
                    ):
                        raise job_busy(parsed.name)
                except Exception as exc:
                    results.append(exc)
                    continue
                results.append((previous, replaced))
                todo.append((i, parsed, migration_id))
            if todo:
                try:
                    self._defs.write_many([d for _, d, _ in todo], after_rename)
                except Exception as exc:
                    for i, _, _ in todo:
                        results[i] = exc
                    return results
        if len(todo) == 1:
            i, d, migration_id = todo[0]
            log.info(
                "domain_persisted",
                migration_id=migration_id,
                name=d.name,
                uuid=d.uuid,
                replaced=results[i][1],  # type: ignore[index]
            )
        elif todo:  # a group commit: one line for the group (logging is per-domain CPU)
            log.info(
                "domains_persisted",
                count=len(todo),
                migration_ids=[m for _, _, m in todo],
                names=[d.name for _, d, _ in todo],
                replaced=[d.name for i, d, _ in todo if results[i][1]],  # type: ignore[index]
            )
        return results

    def unpersist(self, migration_id: str, previous: DomainDef | None) -> None:
        """See :meth:`common.store.HostStore.unpersist_incoming`."""
        validate_migration_id(migration_id)
        with self._lock.held():
            rec = self._own(migration_id)
            if previous is not None:
                self._defs.write(previous)
            else:
                self._defs.remove(require_uuid(rec.domain_uuid, "domain uuid"))
        log.warning("incoming_persist_undone", migration_id=migration_id)

    def release(self, migration_id: str) -> None:
        """See :meth:`common.store.HostStore.release_incoming`."""
        validate_migration_id(migration_id)
        with self._lock.held():
            rec = self._journal.read(migration_id)
            if rec is not None and rec.role == Role.DESTINATION:
                # a reservation that comes back after a crash is dropped at start-up
                with self.index.changing(migration_id, None):
                    self._journal.remove(migration_id, durable=False)
