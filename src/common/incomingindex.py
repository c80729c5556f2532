"""The incoming reservations (the journal's destination records) as one process last saw
them, so that the conflict checks of a busy host (every Prepare, Finish, Begin and undefine
asks "does an incoming migration hold this name or UUID?") need not scan and stat every file
of ``jobs/`` each time.

The index is current while the store lock's journal counter (common/storelock.py) is even and
still where this process left it: every change that can alter the set of reservations, by any
process, is made under the store lock and bracketed by the counter (odd while under way), and
this process applies its own changes to the index as it makes them. Any other value (another
process changed the set, or a writer died half-way and left the counter odd) means a scan, as
before. Used only with the store lock held; without it, callers scan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vmmigrate.common.journal import JobRecord, Journal, Role
from vmmigrate.common.storelock import StoreLock
from vmmigrate.common.uuids import canonical_uuid_or_none


class IncomingIndex:
    def __init__(self, lock: StoreLock, journal: Journal) -> None:
        self._lock = lock
        self._journal = journal
        self._records: dict[str, JobRecord] = {}
        self._by_name: dict[str, list[JobRecord]] = {}
        self._by_uuid: dict[str, list[JobRecord]] = {}  # canonical UUID -> records
        self._generation: int | None = None  # the counter the index is current for
        self.scans = 0  # full scans of jobs/ (tests)

    def records(self) -> list[JobRecord]:
        """The destination records (store lock held)."""
        return list(self._current().values())

    def holder(self, name: str | None, uuid: str, ignore: str | None) -> JobRecord | None:
        """The reservation (other than ``ignore``'s) of ``name`` or ``uuid`` (store lock
        held): by dictionary look-ups, not a pass over every record."""
        self._current()
        key = canonical_uuid_or_none(uuid) or uuid
        found: list[JobRecord] = [*self._by_name.get(name or "", []), *self._by_uuid.get(key, [])]
        for rec in found:
            if rec.migration_id != ignore:
                return rec
        return None

    def _current(self) -> dict[str, JobRecord]:
        g = self._lock.read_journal_generation()
        if g % 2 == 0 and g == self._generation:
            return self._records
        self.scans += 1
        found = {r.migration_id: r for r in self._journal.read_all() if r.role == Role.DESTINATION}
        self._records = found
        self._reindex()
        self._generation = g if g % 2 == 0 else None
        return found

    def _reindex(self) -> None:
        by_name: dict[str, list[JobRecord]] = {}
        by_uuid: dict[str, list[JobRecord]] = {}
        for rec in self._records.values():
            by_name.setdefault(rec.domain_name, []).append(rec)
            key = canonical_uuid_or_none(rec.domain_uuid) or rec.domain_uuid
            by_uuid.setdefault(key, []).append(rec)
        self._by_name, self._by_uuid = by_name, by_uuid

    @contextlib.contextmanager
    def changing(self, migration_id: str, written: JobRecord | None) -> Iterator[None]:
        """Bracket a write (``written``: the record, if it is a destination record) or a
        removal (None) of ``migration_id``'s record (store lock held)."""
        g = self._lock.read_journal_generation()
        current = g % 2 == 0 and g == self._generation
        begin = g + 1 if g % 2 == 0 else g
        self._lock.write_journal_generation(begin)
        self._generation = None
        ok = False
        try:
            yield
            ok = True
        finally:
            # left odd if this write fails: every reader scans, which is slow but right
            self._lock.write_journal_generation(begin + 1)
            if ok and current:
                self._apply(migration_id, written)
                self._generation = begin + 1

    def _apply(self, migration_id: str, written: JobRecord | None) -> None:
        old = self._records.pop(migration_id, None)
        if old is not None:
            self._drop(self._by_name, old.domain_name, old)
            self._drop(
                self._by_uuid, canonical_uuid_or_none(old.domain_uuid) or old.domain_uuid, old
            )
        if written is not None and written.role == Role.DESTINATION:
            self._records[migration_id] = written
            self._by_name.setdefault(written.domain_name, []).append(written)
            key = canonical_uuid_or_none(written.domain_uuid) or written.domain_uuid
            self._by_uuid.setdefault(key, []).append(written)

    @staticmethod
    def _drop(index: dict[str, list[JobRecord]], key: str, rec: JobRecord) -> None:
        recs = index.get(key)
        if recs is None:
            return
        recs[:] = [r for r in recs if r is not rec]
        if not recs:
            del index[key]
