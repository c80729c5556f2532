"""Migration history: one small record per finished migration, kept in the host state
directory so that it survives restarts (``migctl jobs``, ``domjobinfo --completed``).

Both daemons of a host write here (srcd its source jobs, dstd its incoming ones). Records
are JSON lines appended to *segments*, ``history/<first end time ns>-<writer>-<token>.jsonl``:
each writer (each History object, one per daemon) appends to a segment of its own, so the
two processes never write the same file and need no lock, and starts a new one every
SEGMENT_RECORDS records. A record is one ``write()`` of a whole line with O_APPEND; a reader
takes only the lines that end in a newline, so it sees a record whole or not at all.

Why segments and not a file per record: creating a file costs an inode allocation, the
dearest file operation of an offline migration on a busy ext4 (0.1-1 ms of CPU each on the
machine of docs/PERFORMANCE.md), where an append to an open file costs microseconds.

Writes are not fsync'd: a history record lost in a power cut costs an operator one line of
``migctl jobs``, never a domain, and a finished migration should not wait on the disk for
it. The journal (common/journal.py) stays what recovery trusts; history is only a report.
The history is bounded (``history_limit``, both daemons together): readers show the newest
``limit`` records, and each writer, when it starts a segment, removes its own finished
segments whose records are all older than those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from vmmigrate.common.durable import TEMP_PREFIX, report_unreadable, storage_errors

log = structlog.get_logger("vmmigrate.history")

DEFAULT_HISTORY_LIMIT = 1000

# A destination record's job time (ms) in its statistics: from the source's Begin to the end
# of Finish, as libvirt's destination reports it (its own record's times start at Prepare).
JOB_ELAPSED = "job-elapsed"

# Records per segment file: a writer starts a new segment (and prunes) every this many.
SEGMENT_RECORDS = 64
SUFFIX = ".jsonl"
# Before segments, each record was a file of its own (``<end ns>-<role>-<id>.json``, one
# JSON document): still read, and pruned by any writer.
LEGACY_SUFFIX = ".json"


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
        # shallow: json.dumps walks ``stats`` itself (asdict would deep-copy it first)
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistoryRecord:
        return cls(**{k: v for k, v in data.items() if k in _FIELD_SET})


_FIELDS = tuple(f.name for f in dataclasses.fields(HistoryRecord))
_FIELD_SET = frozenset(_FIELDS)


@dataclasses.dataclass
class _Segment:
    """What a reader took from one segment so far: the bytes up to its last whole line,
    and the records in them."""

    consumed: int = 0
    records: list[HistoryRecord] = dataclasses.field(default_factory=list)

    @property
    def newest(self) -> float:
        return max((r.ended_unix for r in self.records), default=0.0)


class History:
    """The history directory of one host (shared by its srcd and dstd), as one writer
    (``writer``: the daemon's name) appends to it and any reader lists it."""

    def __init__(
        self, state_dir: Path, limit: int = DEFAULT_HISTORY_LIMIT, writer: str = "history"
    ) -> None:
        self.directory = state_dir / "history"
        self.limit = limit
        self.writer = writer
        self._made = False
        self._lock = threading.Lock()  # add() and list() may run on worker threads
        self._segment = ""  # this writer's current segment (its file name)
        self._in_segment = 0
        self._cache: dict[str, _Segment] = {}

    def add(self, rec: HistoryRecord) -> None:
        """Append ``rec`` (not fsync'd: see the module docstring) to this writer's segment,
        starting a new one (and pruning) every SEGMENT_RECORDS records."""
        line = (json.dumps(rec.to_dict(), separators=(",", ":")) + "\n").encode()
        with self._lock, storage_errors("write", self.directory):
            if not self._segment or self._in_segment >= SEGMENT_RECORDS:
                self._start_segment(rec.ended_unix or time.time())
            self._append(line)

    def _append(self, line: bytes) -> None:
        # Opened for each record, not kept open: a daemon holds no descriptor between
        # migrations, and a segment removed meanwhile (by a second writer of the same name)
        # comes back rather than taking the record with it.
        fd = os.open(
            self.directory / self._segment,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):  # the disk is full: no torn line for the next one to follow
            self._segment = ""
            raise OSError(errno.ENOSPC, "short write")
        self._in_segment += 1

    def _start_segment(self, first_end: float) -> None:
        if not self._made:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._made = True
        self._segment = f"{int(first_end * 1e9):020d}-{self.writer}-{secrets.token_hex(4)}{SUFFIX}"
        self._in_segment = 0
        self._prune()

    def _prune(self) -> int:
        """Remove this writer's finished segments whose records are all older than the
        newest ``limit`` of the host; a segment another process removed is fine."""
        segments = self._scan()
        ends = sorted(
            (r.ended_unix for seg in segments.values() for r in seg.records), reverse=True
        )
        if len(ends) <= self.limit:
            return 0
        cutoff = ends[self.limit - 1] if self.limit else float("inf")
        removed = 0
        for name, seg in list(segments.items()):
            legacy = name.endswith(LEGACY_SUFFIX)
            if name == self._segment or not (legacy or f"-{self.writer}-" in name):
                continue
            if seg.newest < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                self._cache.pop(name, None)
                removed += 1
        return removed

    def prune(self) -> int:
        """Remove what is beyond the limit now (see _prune); returns how many segments."""
        with self._lock, storage_errors("prune", self.directory):
            return self._prune()

    def _names(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(
            n
            for n in names
            if n.endswith((SUFFIX, LEGACY_SUFFIX)) and not n.startswith(TEMP_PREFIX)
        )

    def _scan(self) -> dict[str, _Segment]:
        """Every segment's records, reading only what was appended since the last scan."""
        names = self._names()
        fresh: dict[str, _Segment] = {}
        for name in names:
            seg = self._cache.get(name) or _Segment()
            self._read_new(name, seg)
            fresh[name] = seg
        self._cache = fresh
        return fresh

    def _read_new(self, name: str, seg: _Segment) -> None:
        path = self.directory / name
        try:
            if os.stat(path).st_size <= seg.consumed:
                return  # nothing new
            with open(path, "rb") as fh:
                fh.seek(seg.consumed)
                data = fh.read()
        except FileNotFoundError:
            return  # pruned meanwhile
        except OSError as exc:
            report_unreadable(path, exc.strerror or str(exc))
            return
        if name.endswith(LEGACY_SUFFIX):  # one whole record (written atomically)
            whole, lines = len(data), [data] if data else []
        else:  # a line still being written is left for later
            whole = data.rfind(b"\n") + 1
            lines = data[:whole].splitlines()
        for line in lines:
            rec = _parse(line)
            if rec is None:
                report_unreadable(path, f"a record that is not valid: {line[:80]!r}")
                continue
            seg.records.append(rec)
        seg.consumed += whole

    def _newest(self) -> list[HistoryRecord]:
        """The newest ``limit`` records of the host, oldest first (records beyond the
        limit that no writer pruned yet are not shown)."""
        with self._lock, storage_errors("list", self.directory):
            segments = self._scan()
        records = [r for seg in segments.values() for r in seg.records]
        records.sort(key=lambda r: (r.ended_unix, r.role, r.migration_id))
        return records[-self.limit :] if self.limit else []

    def list(
        self, domain: str = "", limit: int = 0, role: str = "", kind: str = ""
    ) -> list[HistoryRecord]:
        """Records, oldest first; ``domain`` matches a name or a UUID; ``limit`` keeps the
        newest ``limit`` (0: all); ``role`` and ``kind`` keep those of that role or kind."""
        out = [
            rec
            for rec in self._newest()
            if not (domain and domain not in (rec.domain, rec.domain_uuid))
            and not (role and rec.role != role)
            and not (kind and rec.kind != kind)
        ]
        return out[-limit:] if limit else out

    def last(self, domain_uuid: str, role: str) -> HistoryRecord | None:
        found = self.list(domain=domain_uuid, limit=1, role=role)
        return found[0] if found else None


def _parse(line: bytes) -> HistoryRecord | None:
    try:
        data = json.loads(line)
        return HistoryRecord.from_dict(data) if isinstance(data, dict) else None
    except (ValueError, TypeError):
        return None
