"""Source-side migration jobs: what srcd holds for a domain from Begin to Confirm.

A job owns three things, acquired in Begin and given back when it ends (Confirm, a failed
Prepare, or expiry of a parked client-driven job): the cross-process job lock of the domain,
the job's journal record, and a place in the job table. They are released by the job's
cleanup stack, in reverse order of acquisition, whatever ended it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Any

import structlog
from vmmigrate.common.domainxml import DomainDef
from vmmigrate.common.errors import OperationInvalid
from vmmigrate.common.flags import MigrateFlag, flag_names
from vmmigrate.common.phase import Phase, advance
from vmmigrate.common.rpc import Deadline
from vmmigrate.common.store import JobLock, JobRecord
from vmmigrate.srcd.storage import CopiedDisk

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.jobs")


@dataclasses.dataclass(frozen=True)
class SourceParams:
    """The typed parameters a migration was started with (libvirt's VIR_MIGRATE_PARAM_*)."""

    dest_name: str = ""
    dest_xml: str = ""
    persist_xml: str = ""
    migrate_uri: str = ""
    bandwidth_mib: int = 0
    timeout_s: int = 0
    timeout_suspend: bool = False
    migrate_disks: tuple[str, ...] = ()  # --migrate-disks: checked in Begin

    @classmethod
    def from_pb(cls, p: pb.MigrationParams) -> SourceParams:
        return cls(
            dest_name=p.dest_name,
            dest_xml=p.dest_xml,
            persist_xml=p.persist_xml,
            migrate_uri=p.migrate_uri,
            bandwidth_mib=p.bandwidth_mib,
            timeout_s=p.timeout_s,
            timeout_suspend=p.timeout_suspend,
            migrate_disks=tuple(p.migrate_disks),
        )

    def to_pb(self) -> pb.MigrationParams:
        """What the destination gets. DEST_XML stays out: Begin checked it, and Prepare
        receives it as the domain XML itself."""
        return pb.MigrationParams(
            dest_name=self.dest_name,
            persist_xml=self.persist_xml,
            migrate_uri=self.migrate_uri,
            bandwidth_mib=self.bandwidth_mib,
            timeout_s=self.timeout_s,
            timeout_suspend=self.timeout_suspend,
        )


class JobOutcome(enum.StrEnum):
    """How a live migration job ended (domjobinfo --completed's job type)."""

    NONE = ""  # not ended yet
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class CompletedJob:
    """What domjobinfo --completed shows after a live migration job ended."""

    migration_id: str
    outcome: JobOutcome
    error: str
    elapsed_ms: int
    stats: dict[str, Any]
    ended_unix: float = 0.0  # which of it and the history's records is the newest


@dataclasses.dataclass
class SourceJob:
    """One outgoing migration of one domain."""

    migration_id: str
    domain: DomainDef
    flags: MigrateFlag
    params: SourceParams
    peer: str
    deadline: Deadline
    record: JobRecord
    lock: JobLock
    cleanup: contextlib.AsyncExitStack
    phase: Phase = Phase.BEGIN3
    last_active: float = dataclasses.field(default_factory=time.monotonic)
    # Set by the p2p driver while it runs the job; a parked (client-driven) job has none.
    driven: bool = False
    # Live migration: was the domain running at Begin (Confirm(cancelled) resumes it only
    # then), the latest query-migrate statistics, and whether a client asked to abort.
    was_running: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.monotonic)
    abort_requested: bool = False
    peer_lost: bool = False
    outcome: JobOutcome = JobOutcome.NONE
    error: str = ""
    # (phase label, monotonic time) of each phase entered: the phase durations metric
    entered: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    started_unix: float = dataclasses.field(default_factory=time.time)
    # storage copy: the disks mirrored to the destination (Begin decides), and the
    # mirrors' latest figures (bytes: total, transferred, remaining; srcd/mirror.py)
    copies: tuple[CopiedDisk, ...] = ()
    mirror: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entered.append((self.phase.label, self.started))

    def all_stats(self) -> dict[str, Any]:
        """query-migrate's statistics, with the mirrors' under "mirror" (domjobinfo's File
        lines and its Data totals)."""
        if not self.mirror:
            return dict(self.stats)
        return {**self.stats, "mirror": dict(self.mirror)}

    @property
    def offline(self) -> bool:
        return MigrateFlag.OFFLINE in self.flags

    def advance(self, new: Phase) -> None:
        """Move to ``new`` (the source's table), and the journal record with it (the
        caller writes it: how durably depends on the phase)."""
        self.phase = advance(
            self.phase, new, "source", migration_id=self.migration_id, domain=self.domain.name
        )
        self.record = self.record.with_phase(new.label)
        self.last_active = time.monotonic()
        self.entered.append((new.label, self.last_active))

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def completed(self) -> CompletedJob:
        return CompletedJob(
            migration_id=self.migration_id,
            outcome=self.outcome,
            error=self.error,
            elapsed_ms=int((time.monotonic() - self.started) * 1000),
            stats=self.all_stats(),
            ended_unix=time.time(),
        )


class SourceJobTable:
    """The jobs of this srcd, by migration id. Only the event loop thread touches it."""

    def __init__(self) -> None:
        self._jobs: dict[str, SourceJob] = {}
        # called with each job that ends (history and metrics); set by the server
        self.on_end: Callable[[SourceJob], None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: SourceJob) -> None:
        if job.migration_id in self._jobs:
            raise OperationInvalid(f"migration id '{job.migration_id}' is already in use")
        self._jobs[job.migration_id] = job
        job.cleanup.callback(self._jobs.pop, job.migration_id, None)

    def get(self, migration_id: str, domain: str | None = None) -> SourceJob:
        job = self._jobs.get(migration_id)
        if job is None or (domain and domain not in (job.domain.name, job.domain.uuid)):
            raise OperationInvalid(
                f"no migration job with id '{migration_id}' is active on this host"
            )
        return job

    def for_domain(self, uuid: str) -> SourceJob | None:
        for job in self._jobs.values():
            if job.domain.uuid == uuid:
                return job
        return None

    async def end(self, job: SourceJob) -> None:
        """Give back everything the job holds (lock, journal record, table slot)."""
        held = self._jobs.get(job.migration_id) is job  # a second end() reports nothing
        await job.cleanup.aclose()
        if held and self.on_end is not None:
            self.on_end(job)
        log.debug(
            "job_ended",
            migration_id=job.migration_id,
            domain=job.domain.name,
            phase=job.phase.label,
            flags=flag_names(job.flags),
        )

    def stale(self, idle_timeout: float, done_timeout: float) -> list[SourceJob]:
        """Parked client-driven jobs whose client went away: idle too long, or past the
        migration's deadline (libvirt aborts them when the client's connection closes;
        gRPC has no such signal, so an idle time and the deadline stand in for it). A job
        whose stream completed (PERFORM3_DONE) waits only for the client's Finish, so it
        is given up sooner (``done_timeout``): its domain is paused meanwhile."""
        now = time.monotonic()

        def limit(j: SourceJob) -> float:
            return (
                min(idle_timeout, done_timeout) if j.phase is Phase.PERFORM3_DONE else idle_timeout
            )

        return [
            j
            for j in self._jobs.values()
            if not j.driven and (now - j.last_active > limit(j) or j.deadline.expired())
        ]
