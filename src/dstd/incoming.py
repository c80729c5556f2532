"""Destination-side migration jobs: what dstd holds for a domain from Prepare to Finish.

An incoming job is a reservation of the name and UUID in the host store (a journal record,
never a domain definition), plus for a live migration an incoming emulator and a migration
port, plus an entry in this table. Finish turns it into a running and/or persisted domain,
or drops it; a job whose Finish never comes (the source died) is dropped when its deadline
passes. Dropping kills the incoming emulator, frees the port and the reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable

import structlog
from vmmigrate.common.domainxml import DomainDef
from vmmigrate.common.errors import OperationInvalid
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.groupcommit import offloader
from vmmigrate.common.hypervisor import QMPHypervisor
from vmmigrate.common.phase import Phase, advance
from vmmigrate.common.rpc import Deadline
from vmmigrate.common.store import HostStore, JobRecord
from vmmigrate.dstd.ports import PortAllocator
from vmmigrate.dstd.storage import remove_disks

log = structlog.get_logger("vmmigrate.dstd.incoming")


@dataclasses.dataclass
class IncomingJob:
    migration_id: str
    target: DomainDef  # the definition to persist, already renamed (DEST_NAME)
    origname: str  # the name on the source (cookies carry it)
    flags: MigrateFlag
    record: JobRecord
    deadline: Deadline
    replaces: bool  # an inactive definition with the same name and UUID exists here
    phase: Phase = Phase.PREPARE
    last_active: float = dataclasses.field(default_factory=time.monotonic)
    busy: bool = False  # its Finish is running (a second one is told JobActive)
    # Finish announced the domain here (Started Migrated): from then on its emulator's
    # unexpected end is the domain's (Stopped Failed), before it only the migration's
    announced: bool = False
    # live migration
    host: str = ""
    port: int = 0
    path: str = ""  # a tunnelled migration's incoming unix socket (no port is used)
    emulator_started: bool = False
    # storage copy (dstd/storage.py): the NBD server's port, or its unix socket when
    # tunnelled, and the disks this job created (removed unless the domain ends up here)
    nbd_port: int = 0
    nbd_path: str = ""
    created_disks: tuple[str, ...] = ()
    # set when Prepare is over (it succeeded or failed): Finish waits for it
    prepared: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # set once Finish persisted the definition: takes it back if Finish fails afterwards
    undo_persist: Callable[[], None] | None = None
    # how it ended, for the history: completed | cancelled | failed (the default)
    result: str = ""
    error: str = ""
    started_unix: float = dataclasses.field(default_factory=time.time)
    # the Perform cookie's <statistics> (live), and when Finish received it: the history's
    # downtime, bytes and times of the migration (dstd/report.py)
    cookie_stats: tuple[tuple[str, str], ...] = ()
    cookie_received_unix: float = 0.0
    # (phase label, monotonic time) of each phase entered: the phase durations metric
    entered: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.entered.append((self.phase.label, self.last_active))

    @property
    def offline(self) -> bool:
        return MigrateFlag.OFFLINE in self.flags

    @property
    def tunnelled(self) -> bool:
        return MigrateFlag.TUNNELLED in self.flags

    def advance(self, new: Phase) -> None:
        """Move to ``new`` (the destination's table), and the journal record with it (the
        caller writes it)."""
        self.phase = advance(
            self.phase,
            new,
            "destination",
            migration_id=self.migration_id,
            domain=self.target.name,
        )
        self.record = self.record.with_phase(new.label)
        self.last_active = time.monotonic()
        self.entered.append((new.label, self.last_active))


class IncomingTable:
    def __init__(self, store: HostStore, hypervisor: QMPHypervisor, ports: PortAllocator) -> None:
        self._store = store
        self._hv = hypervisor
        self._ports = ports
        self._offload = offloader(inline=self.alone)
        self._jobs: dict[str, IncomingJob] = {}
        # called with each job that ends (history and metrics); set by the server
        self.on_drop: Callable[[IncomingJob], None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def alone(self) -> bool:
        """At most one incoming migration: its small store writes need no thread hand-off
        (common/groupcommit.py, ``inline``)."""
        return len(self._jobs) <= 1

    def __contains__(self, migration_id: str) -> bool:
        return migration_id in self._jobs

    def add(self, job: IncomingJob) -> None:
        self._jobs[job.migration_id] = job

    def get(self, migration_id: str, dest_name: str) -> IncomingJob:
        job = self._jobs.get(migration_id)
        if job is None:
            raise OperationInvalid(f"domain '{dest_name}' is not processing incoming migration")
        return job

    def find(self, migration_id: str) -> IncomingJob | None:
        return self._jobs.get(migration_id)

    def for_domain(self, uuid: str) -> IncomingJob | None:
        for job in self._jobs.values():
            if job.target.uuid == uuid:
                return job
        return None

    async def drop(self, job: IncomingJob, *, keep_running: bool = False) -> None:
        """Forget the job: kill its incoming emulator (unless it now runs the domain) and
        then remove the disks it created, free its ports, give back its reservation."""
        if self._jobs.pop(job.migration_id, None) is job and self.on_drop is not None:
            self.on_drop(job)
        if job.emulator_started and not keep_running:
            await self._hv.kill(job.target.uuid)
        if job.created_disks and not keep_running:
            # after the kill: nothing writes them any more
            await asyncio.to_thread(remove_disks, job.created_disks)
            job.created_disks = ()
        for port in (job.port, job.nbd_port):
            if port:
                self._ports.release(port)
        job.port = job.nbd_port = 0
        for path in (job.path, job.nbd_path):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        # a plain unlink, but off the event loop (groupcommit.offloader)
        await self._offload.submit(
            functools.partial(self._store.release_incoming, job.migration_id)
        )

    async def expire(self, idle_timeout: float) -> int:
        now = time.monotonic()
        stale = [
            j
            for j in self._jobs.values()
            # a live job waits for its stream between Prepare and Finish: only its deadline
            # bounds it; an offline one has nothing to wait for
            if not j.busy
            and (j.deadline.expired() or (j.offline and now - j.last_active > idle_timeout))
        ]
        for job in stale:
            log.warning("incoming_expired", migration_id=job.migration_id, domain=job.target.name)
            job.error = job.error or "the migration's deadline passed before its Finish"
            await self.drop(job)
        return len(stale)
