"""What a starting dstd does with the incoming migrations a previous dstd left behind.

It runs before the server answers anything, so that every Finish (a retry from a source
that lost the answer, or a restarted source asking how its migration ended) is answered
from a settled state, and each migration is settled to exactly one outcome, remembered in
the store:

| left behind                                   | what happens                         | outcome   |
|-----------------------------------------------|--------------------------------------|-----------|
| an outcome already written                    | the reservation goes                 | as written|
| offline, the definition is here, as sent      | the reservation goes                 | finished  |
| offline, otherwise                            | the reservation goes                 | cancelled |
| live PREPARE (libvirt: kill it)               | incoming emulator killed             | cancelled |
| live FINISH3, the stream arrived whole        | Finish completed: persisted with     | finished  |
|                                               | --persistent, resumed unless paused  |           |
| live FINISH3, stream incomplete or emulator   | emulator killed                      | cancelled |
| gone (libvirt: kill unless running)           |                                      |           |

Storage copy: the disks a migration created here (``created_disks`` of its record) are
removed when its outcome is not "finished", kept when it is.

libvirt keeps a FINISH3 domain only if it already runs, and never recovers offline
migrations; completing a FINISH3 whose stream is whole is the same decision made one step
later, and safe: the source never resumes while Finish's outcome is unknown to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from vmmigrate.common.disks import STORAGE_COPY
from vmmigrate.common.domainxml import parse_domain
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.hypervisor import QMPHypervisor, RunState
from vmmigrate.common.phase import Phase
from vmmigrate.common.qmp import QMPError, QMPExecuteError
from vmmigrate.common.store import (
    OUTCOME_CANCELLED,
    OUTCOME_FINISHED,
    HostStore,
    JobRecord,
    MigrationOutcome,
    Outcome,
)
from vmmigrate.dstd.storage import remove_disks

log = structlog.get_logger("vmmigrate.dstd.recovery")


def _outcome(rec: JobRecord, what: Outcome, active: bool = False) -> MigrationOutcome:
    finished = what == OUTCOME_FINISHED
    return MigrationOutcome(
        migration_id=rec.migration_id,
        outcome=what,
        domain_name=rec.domain_name if finished else "",
        domain_uuid=rec.domain_uuid if finished else "",
        origname=(rec.source_name or rec.domain_name) if finished else "",
        active=active,
    )


def _settle_offline(store: HostStore, rec: JobRecord) -> Outcome:
    here = store.find(rec.domain_uuid)
    if here is not None and rec.xml and here.xml == rec.xml:
        return OUTCOME_FINISHED
    return OUTCOME_CANCELLED


async def _settle_live(store: HostStore, hv: QMPHypervisor, rec: JobRecord) -> tuple[Outcome, bool]:
    uuid = rec.domain_uuid
    status = "shutoff"
    if hv.record(uuid) is not None:
        try:
            status = await hv.status(uuid)
        except (QMPError, VmmigrateError, OSError) as exc:
            log.warning("recovery_status_failed", migration_id=rec.migration_id, error=str(exc))
            status = "unknown"
    if rec.phase == Phase.FINISH3.label and status in (RunState.RUNNING, RunState.PAUSED):
        flags = MigrateFlag(rec.flags)
        if MigrateFlag.PERSIST_DEST in flags:
            target = parse_domain(rec.xml, generate_uuid=False, max_bytes=len(rec.xml.encode()) + 1)
            await asyncio.to_thread(store.persist_incoming, rec.migration_id, target)
        if flags & STORAGE_COPY:
            # as Finish: no NBD client may write the disks behind the guest (a server
            # already stopped answers an error)
            with contextlib.suppress(QMPExecuteError):
                await hv.execute(uuid, "nbd-server-stop")
        if MigrateFlag.PAUSED not in flags and status == "paused":
            await hv.execute(uuid, "cont")
        return OUTCOME_FINISHED, True
    if hv.record(uuid) is not None:
        await hv.kill(uuid)
    await asyncio.to_thread(hv.kill_strays, uuid)
    return OUTCOME_CANCELLED, False


async def recover_incoming_jobs(
    store: HostStore, hv: QMPHypervisor, counted: Callable[[str], None] | None = None
) -> int:
    """Settle every incoming migration in the journal (see the module's table); returns
    how many were found. ``counted`` gets each one's outcome (the recovery metric)."""
    records = await asyncio.to_thread(store.journal_list, "destination")
    for rec in records:
        known = await asyncio.to_thread(store.outcome_get, rec.migration_id)
        active = False
        if known is not None:
            what = known.outcome
        elif MigrateFlag.OFFLINE in MigrateFlag(rec.flags):
            what = await asyncio.to_thread(_settle_offline, store, rec)
        else:
            try:
                what, active = await _settle_live(store, hv, rec)
            except (QMPError, VmmigrateError, OSError) as exc:
                log.error("recovery_failed", migration_id=rec.migration_id, error=str(exc))
                if hv.record(rec.domain_uuid) is not None:
                    await hv.kill(rec.domain_uuid)
                what = OUTCOME_CANCELLED
        if known is None:
            await asyncio.to_thread(
                store.outcome_put,
                _outcome(rec, what, active),
                durable=what == OUTCOME_FINISHED,
            )
        if rec.created_disks and what != OUTCOME_FINISHED:
            # storage copy: the disks it created go with it (its emulator is gone)
            await asyncio.to_thread(remove_disks, rec.created_disks)
        await asyncio.to_thread(store.release_incoming, rec.migration_id)
        if counted is not None:
            counted(what)
        log.warning(
            "incoming_job_recovered",
            migration_id=rec.migration_id,
            domain=rec.domain_name,
            phase=rec.phase,
            outcome=what,
        )
    return len(records)
