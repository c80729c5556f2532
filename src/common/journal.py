"""The job journal: one record per migration in flight, on either role
(``STATE_DIR/jobs/<migration_id>.json``), rewritten at each phase so that a restarted daemon
can settle what its predecessor left half-done.

A destination record is also the reservation of the incoming domain's name and UUID (see
:mod:`common.reservations`). Reads take no lock (files are only ever replaced by rename, so
a reader sees whole files); writes happen under the store lock, which the caller holds.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmmigrate.common.durable import (
    TEMP_PREFIX,
    atomic_write,
    durable_unlink,
    report_unreadable,
    storage_errors,
)
from vmmigrate.common.errors import InvalidArgument

_MIGRATION_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
_MAX_MIGRATION_ID = 128


class Role(enum.StrEnum):
    """Which side of a migration a job record is (the JSON on disk holds the value)."""

    SOURCE = "source"
    DESTINATION = "destination"


@dataclass(frozen=True)
class JobRecord:
    """One migration in flight, as the job journal keeps it (rewritten at each phase)."""

    migration_id: str
    role: Role
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
    # destination, storage copy: the disks this migration creates, written before the first
    # of them exists (recovery removes them unless the migration finished here)
    created_disks: tuple[str, ...] = ()

    def with_phase(self, phase: str) -> JobRecord:
        return dataclasses.replace(self, phase=phase, updated_unix=time.time())


# JSON type of each field (annotations are strings here); a Role is stored as its value.
_RECORD_TYPES: dict[str, type] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "Role": str,
    "tuple[str, ...]": tuple,
}


def role_of(value: str) -> Role:
    """``value`` as a Role; InvalidArgument if it is none."""
    try:
        return Role(value)
    except ValueError:
        raise InvalidArgument(f"invalid job role {value!r}") from None


# (name, JSON type, required) of each field, worked out once: records are read and
# written several times per migration, and dataclasses.fields/asdict (which deep-copies
# every value) cost more than the JSON itself
_FIELDS: tuple[tuple[str, type, bool], ...] = tuple(
    (f.name, _RECORD_TYPES[str(f.type)], f.default is dataclasses.MISSING)
    for f in dataclasses.fields(JobRecord)
)


def record_to_bytes(rec: JobRecord) -> bytes:
    doc = {name: getattr(rec, name) for name, _, _ in _FIELDS}  # a Role dumps as its value
    return json.dumps(doc, sort_keys=True).encode("utf-8")


def record_from_bytes(data: bytes) -> JobRecord:
    """Parse one journal file; ValueError if it is not a well-formed record."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    values: dict[str, Any] = {}
    for name, want, required in _FIELDS:
        if name not in obj:
            if required:
                raise ValueError(f"missing field {name!r}")
            continue
        value = obj[name]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is tuple:  # a JSON list of strings
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"field {name!r} is not a list of strings")
            value = tuple(value)
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ValueError(f"field {name!r} is not a {want.__name__}")
        values[name] = value
    values["role"] = Role(values["role"])  # ValueError for a role we do not know
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


class Journal:
    """The records in ``jobs/``. Migration ids are validated by the caller."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # file name -> ((inode, mtime_ns, size), record): read_all parses a file again only
        # when it changed. Every write stamps a fresh nanosecond mtime (as definitions do),
        # so that a rewrite that reuses a freed inode within a clock tick still misses.
        self._cache: dict[str, tuple[tuple[int, int, int], JobRecord]] = {}

    def path(self, migration_id: str) -> Path:
        return self.directory / f"{migration_id}.json"

    def read(self, migration_id: str) -> JobRecord | None:
        """One record; None if absent or unreadable (reported)."""
        path = self.path(migration_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            report_unreadable(path, exc.strerror or str(exc))
            return None
        try:
            rec = record_from_bytes(data)
        except (ValueError, TypeError) as exc:
            report_unreadable(path, str(exc))
            return None
        if path.name != f"{rec.migration_id}.json":
            report_unreadable(path, f"holds migration id {rec.migration_id!r}")
            return None
        return rec

    def read_all(self) -> list[JobRecord]:
        """Every readable record, in no particular order (unchanged files from the cache)."""
        old = self._cache
        new: dict[str, tuple[tuple[int, int, int], JobRecord]] = {}
        with storage_errors("list", self.directory), os.scandir(self.directory) as entries:
            found = [
                e
                for e in entries
                if not e.name.startswith(TEMP_PREFIX) and e.name.endswith(".json")
            ]
        for entry in found:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile (or unreadable: read() reports it)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            hit = old.get(entry.name)
            if hit is not None and hit[0] == key:
                new[entry.name] = hit
                continue
            rec = self.read(entry.name[: -len(".json")])
            if rec is not None:
                new[entry.name] = (key, rec)
        self._cache = new
        return [rec for _, rec in new.values()]

    def write(self, rec: JobRecord, *, durable: bool = True) -> None:
        """Write ``rec``, stamped with this process and its times (store lock held)."""
        now = time.time()
        stamped = dataclasses.replace(
            rec,
            pid=os.getpid(),
            started_unix=rec.started_unix or now,
            updated_unix=rec.updated_unix or now,
        )
        atomic_write(
            self.path(rec.migration_id),
            record_to_bytes(stamped),
            durable=durable,
            mtime_ns=time.time_ns(),
        )

    def remove(self, migration_id: str, *, durable: bool = True) -> None:
        durable_unlink(self.path(migration_id), durable=durable)
