"""How each incoming migration ended, on the destination (``STATE_DIR/outcomes/``).

Kept for a while (``outcome_ttl``) so that a source that lost Finish's answer, or restarted,
can ask again and get the same answer, from this dstd or a restarted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmmigrate.common.durable import (
    atomic_write,
    atomic_write_many,
    report_unreadable,
    storage_errors,
)
from vmmigrate.common.errors import InvalidArgument


class Outcome(enum.StrEnum):
    """What an incoming migration's Finish answered (the JSON on disk holds the value)."""

    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class MigrationOutcome:
    """How an incoming migration ended on the destination (what its Finish answered)."""

    migration_id: str
    outcome: Outcome
    domain_name: str = ""  # finished: the domain's name here, and the source's name
    domain_uuid: str = ""
    origname: str = ""
    active: bool = False  # finished live: the domain runs here
    ended_unix: float = 0.0


_FIELDS = dataclasses.fields(MigrationOutcome)


class Outcomes:
    """The outcome records in one directory. Migration ids are validated by the caller."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, migration_id: str) -> Path:
        return self.directory / f"{migration_id}.json"

    def put(self, outcome: MigrationOutcome, *, durable: bool = True) -> None:
        atomic_write(self.path(outcome.migration_id), self._encode(outcome), durable=durable)

    def put_many(self, outcomes: Sequence[MigrationOutcome]) -> None:
        """Several outcomes, durably, with one flush (group commit); all or none."""
        atomic_write_many([(self.path(o.migration_id), self._encode(o), None) for o in outcomes])

    @staticmethod
    def _encode(outcome: MigrationOutcome) -> bytes:
        try:
            kind = Outcome(outcome.outcome)
        except ValueError:
            raise InvalidArgument(f"invalid migration outcome {outcome.outcome!r}") from None
        stamped = dataclasses.replace(
            outcome, outcome=kind, ended_unix=outcome.ended_unix or time.time()
        )
        # shallow (asdict deep-copies each value first); an Outcome dumps as its value
        doc = {f.name: getattr(stamped, f.name) for f in _FIELDS}
        return json.dumps(doc, sort_keys=True).encode("utf-8")

    def get(self, migration_id: str) -> MigrationOutcome | None:
        """The outcome of ``migration_id``; None if none, or unreadable (reported)."""
        path = self.path(migration_id)
        try:
            obj = json.loads(path.read_bytes())
            fields = {f.name for f in dataclasses.fields(MigrationOutcome)}
            if not isinstance(obj, dict) or obj.get("migration_id") != migration_id:
                raise ValueError("not an outcome record for this migration id")
            got = MigrationOutcome(**{k: v for k, v in obj.items() if k in fields})
            if got.outcome not in tuple(Outcome):
                raise ValueError(f"unknown outcome {got.outcome!r}")
            return dataclasses.replace(got, outcome=Outcome(got.outcome))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            report_unreadable(path, str(exc))
            return None

    def expire(self, max_age: float) -> int:
        """Forget outcomes older than ``max_age`` seconds (by file mtime); returns how many."""
        cutoff = time.time() - max_age
        count = 0
        with storage_errors("list", self.directory), os.scandir(self.directory) as entries:
            old = [e.path for e in entries if e.stat().st_mtime < cutoff]
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                count += 1
        return count
