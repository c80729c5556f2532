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


class IncomingIndex:
    def __init__(self, lock: StoreLock, journal: Journal) -> None:
        self._lock = lock
        self._journal = journal
        self._records: dict[str, JobRecord] = {}
        self._generation: int | None = None  # the counter the index is current for
        self.scans = 0  # full scans of jobs/ (tests)

    def records(self) -> list[JobRecord]:
        """The destination records (store lock held)."""
        g = self._lock.read_journal_generation()
        if g % 2 == 0 and g == self._generation:
            return list(self._records.values())
        self.scans += 1
        found = {r.migration_id: r for r in self._journal.read_all() if r.role == Role.DESTINATION}
        self._records = found
        self._generation = g if g % 2 == 0 else None
        return list(found.values())

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
                if written is not None and written.role == Role.DESTINATION:
                    self._records[migration_id] = written
                else:
                    self._records.pop(migration_id, None)
                self._generation = begin + 1
