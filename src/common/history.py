"""Migration history: one small record per finished migration, kept in the host state
directory so that it survives restarts (``migctl jobs``, ``domjobinfo --completed``).

Both daemons of a host write here (srcd its source jobs, dstd its incoming ones). Each
record is its own file, ``history/<end time ns>-<role>-<migration id>.json``, written
atomically (readers see a whole record or none), so the two processes never write the same
file and need no lock. The name sorts by end time, which is what listing and pruning use.

Writes are not fsync'd: a history record lost in a power cut costs an operator one line of
``migctl jobs``, never a domain, and a finished migration should not wait on the disk for
it. The journal (common/journal.py) stays what recovery trusts; history is only a report.
The directory is bounded (``history_limit``): after each write the oldest records beyond
the limit are removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog
from vmmigrate.common.durable import TEMP_PREFIX, atomic_write, report_unreadable

log = structlog.get_logger("vmmigrate.history")

DEFAULT_HISTORY_LIMIT = 1000

# A destination record's job time (ms) in its statistics: from the source's Begin to the end
# of Finish, as libvirt's destination reports it (its own record's times start at Prepare).
JOB_ELAPSED = "job-elapsed"


# How many adds between two prunes of the history directory.
PRUNE_EVERY = 32


@dataclasses.dataclass(frozen=True)
class HistoryRecord:
    """One finished migration as one host saw it (``role``: source or destination)."""

    migration_id: str
    domain: str
    domain_uuid: str
    role: str
    peer: str
    kind: str  # offline | live
    mode: str  # p2p | client-driven | tunnelled
    result: str  # completed | failed | cancelled
    error: str = ""
    started_unix: float = 0.0
    ended_unix: float = 0.0
    bytes: int = 0
    downtime_ms: int = 0
    # domjobinfo --completed's statistics (live), in query-migrate's shape: the source's
    # from its emulator, the destination's from the Perform cookie (dstd/report.py, which
    # adds JOB_ELAPSED); kept so that it reads the same after a restart as before
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def elapsed_ms(self) -> int:
        return max(0, int((self.ended_unix - self.started_unix) * 1000))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistoryRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class History:
    """The history directory of one host (shared by its srcd and dstd)."""

    def __init__(self, state_dir: Path, limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.directory = state_dir / "history"
        self.limit = limit
        self._made = False
        self._since_prune = PRUNE_EVERY  # the first add prunes what a restart found

    def add(self, rec: HistoryRecord) -> None:
        """Write ``rec`` (atomic, not fsync'd: see the module docstring), pruning the oldest
        beyond the limit every PRUNE_EVERY adds (listing the directory at every migration
        cost a tenth of a daemon's CPU per offline migration): so each daemon keeps at
        most ``limit + PRUNE_EVERY`` entries between prunes."""
        if not self._made:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._made = True
        end_ns = int((rec.ended_unix or time.time()) * 1e9)
        name = f"{end_ns:020d}-{rec.role}-{rec.migration_id}.json"
        data = json.dumps(rec.to_dict(), sort_keys=True).encode()
        atomic_write(self.directory / name, data, durable=False)
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            self.prune()

    def _names(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".json") and not n.startswith(TEMP_PREFIX))

    def prune(self) -> int:
        """Remove the oldest records beyond the limit; both daemons may prune at once, so a
        file already gone is fine."""
        names = self._names()
        excess = names[: max(0, len(names) - self.limit)]
        for name in excess:
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                continue
        return len(excess)

    def _read(self, name: str) -> HistoryRecord | None:
        path = self.directory / name
        try:
            return HistoryRecord.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None  # pruned meanwhile
        except (OSError, ValueError, TypeError) as exc:
            report_unreadable(path, str(exc))
            return None

    def list(
        self, domain: str = "", limit: int = 0, role: str = "", kind: str = ""
    ) -> list[HistoryRecord]:
        """Records, oldest first; ``domain`` matches a name or a UUID; ``limit`` keeps the
        newest ``limit`` (0: all); ``role`` and ``kind`` keep those of that role or kind."""
        out: list[HistoryRecord] = []
        for name in reversed(self._names()[-self.limit :]):  # entries not pruned yet: not shown
            rec = self._read(name)
            if rec is None or (domain and domain not in (rec.domain, rec.domain_uuid)):
                continue
            if (role and rec.role != role) or (kind and rec.kind != kind):
                continue
            out.append(rec)
            if limit and len(out) >= limit:
                break
        out.reverse()
        return out

    def last(self, domain_uuid: str, role: str) -> HistoryRecord | None:
        found = self.list(domain=domain_uuid, limit=1, role=role)
        return found[0] if found else None
