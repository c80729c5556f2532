"""What srcd does with migrations whose driver went away: a previous srcd that crashed
(the journal), or a client that stopped driving its migration (a parked job gone idle).

Start-up adopts every source record of the journal before the server answers anything
(the job lock is taken again, so no new migration of the domain can start), then settles
each one in the background, with libvirt's table (docs/ARCHITECTURE.md) as the baseline:

| phase left         | libvirt                    | vmmigrate                              |
|--------------------|----------------------------|----------------------------------------|
| BEGIN3             | forget the job             | ask the destination (below)            |
| PERFORM3           | cancel the stream, resume  | cancel the stream, ask the destination |
| PERFORM3_DONE      | leave paused for a human   | ask the destination                    |
| CONFIRM3_CANCELLED | resume                     | resume (Confirm cancelled again)       |
| CONFIRM3           | kill the source            | Confirm again: stop, --undefinesource  |

"Ask the destination" is Finish(cancelled) by migration id: it cancels the incoming
migration unless its Finish already ran, and answers with its first answer either way
(idempotent, and kept on disk by dstd), so both hosts settle on the same outcome: a domain
there -> Confirm success here; none -> Confirm cancelled (a live source resumes if it was
running). It is asked again, with backoff, until it answers; meanwhile the domain stays
held and, live, paused. Offline migrations are recovered too (libvirt never does): an
offline source never changed before Confirm, so only --undefinesource is at stake.

A job with no destination address (a client-driven migration from a client that does not
send it) falls back to libvirt's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from vmmigrate.common.coordinator import destination_flags
from vmmigrate.common.disks import STORAGE_COPY
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import JobActive, VmmigrateError
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.phase import Phase
from vmmigrate.common.qmp import QMPError
from vmmigrate.common.rpc import Deadline, call
from vmmigrate.common.store import Role
from vmmigrate.common.v3client import DEST, finish_request
from vmmigrate.srcd import phases
from vmmigrate.srcd.context import SourceContext
from vmmigrate.srcd.jobs import SourceJob, SourceParams
from vmmigrate.srcd.mirror import release_leftovers

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.recovery")

_STREAM_ACTIVE = ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug")


def ask_finish(ctx: SourceContext, job: SourceJob, *, cancelled: bool) -> phases.AskFinish:
    """Finish on the job's destination, by migration id (idempotent there)."""
    request = finish_request(
        job.migration_id,
        destination_flags(job.flags),
        dest_name=job.params.dest_name or job.domain.name,
        cancelled=cancelled,
    )

    async def ask() -> pb.FinishResponse:
        response: pb.FinishResponse = await call(
            ctx.peers.destination(job.peer).Finish,
            request,
            timeout=ctx.config.rpc_timeout,
            peer=job.peer,
            what=DEST,
        )
        return response

    return ask


def _domain_of(ctx: SourceContext, uuid: str) -> DomainDef | None:
    """The domain as it is here: its running definition, else its persistent one."""
    rt = ctx.hypervisor.record(uuid)
    if rt is not None and rt.xml:
        return parse_domain(rt.xml, generate_uuid=False, max_bytes=len(rt.xml.encode()) + 1)
    return ctx.store.find(uuid)


def adopt_source_jobs(ctx: SourceContext) -> list[SourceJob]:
    """Take over the journal's source records (before serving): each becomes a held job."""
    adopted = []
    for rec in ctx.store.journal_list(role=Role.SOURCE):
        domain = _domain_of(ctx, rec.domain_uuid)
        if domain is None:
            # nothing left here to settle (Confirm had stopped and undefined it)
            log.info("source_job_already_settled", migration_id=rec.migration_id)
            ctx.store.journal_remove(rec.migration_id, durable=False)
            continue
        try:
            lock = ctx.store.acquire_job(domain)
        except JobActive:
            log.error("source_job_locked_elsewhere", migration_id=rec.migration_id)
            continue
        cleanup = contextlib.AsyncExitStack()
        cleanup.callback(lock.release)
        cleanup.callback(ctx.store.journal_remove, rec.migration_id, durable=False)
        job = SourceJob(
            migration_id=rec.migration_id,
            domain=domain,
            flags=MigrateFlag(rec.flags),
            params=SourceParams(dest_name=rec.dest_name),
            peer=rec.peer,
            deadline=Deadline(ctx.config.migration_timeout),
            record=rec,
            lock=lock,
            cleanup=cleanup,
            phase=Phase.from_label(rec.phase),
            driven=True,
            was_running=rec.was_running,
        )
        ctx.jobs.add(job)
        adopted.append(job)
    return adopted


async def _stop_stream(ctx: SourceContext, job: SourceJob) -> None:
    """Cancel the hypervisor stream if it still runs (QEMU goes on without its daemon), and
    a storage copy's disk mirrors with it."""
    uuid = job.domain.uuid
    if ctx.hypervisor.record(uuid) is None:
        return
    with contextlib.suppress(QMPError, VmmigrateError, OSError):
        await ctx.hypervisor.execute(uuid, "migrate_cancel")
    if job.flags & STORAGE_COPY:
        found = await release_leftovers(ctx.hypervisor, uuid)
        log.info("mirrors_released", migration_id=job.migration_id, jobs=found)
    until = time.monotonic() + 10.0
    while time.monotonic() < until:
        try:
            info = await ctx.hypervisor.execute(uuid, "query-migrate")
        except (QMPError, VmmigrateError, OSError):
            return
        if info.get("status") not in _STREAM_ACTIVE:
            return
        await asyncio.sleep(0.05)


def _action(job: SourceJob) -> str:
    """The recovery action metric's label for a job settle() takes over."""
    if job.phase is Phase.CONFIRM3:
        return "confirm"
    if job.phase is Phase.CONFIRM3_CANCELLED:
        return "confirm-cancelled"
    return "ask-destination" if job.peer else "cancel"


async def settle(ctx: SourceContext, job: SourceJob) -> None:
    """Settle one adopted or abandoned job (see the module's table)."""
    log.warning(
        "source_job_recovering",
        migration_id=job.migration_id,
        domain=job.domain.name,
        phase=job.phase.label,
        peer=job.peer,
    )
    job.driven = True
    ctx.obs.metrics.recovered(_action(job))
    if job.phase is Phase.CONFIRM3:
        await phases.confirm(ctx, job, cancelled=False, cookie=b"")
        return
    if job.phase is Phase.CONFIRM3_CANCELLED:
        await phases.confirm(ctx, job, cancelled=True, cookie=b"")
        return
    if not job.offline and job.phase >= Phase.PERFORM3:
        await _stop_stream(ctx, job)
    if job.peer:
        phases.settle_later(ctx, job, ask_finish(ctx, job, cancelled=True))
        return
    # no destination to ask: libvirt's rules
    if not job.offline and job.phase is Phase.PERFORM3_DONE:
        log.error(
            "finish_outcome_unknown_no_destination",
            migration_id=job.migration_id,
            message=f"Migration of domain {job.domain.name} finished but we don't know if "
            "the domain was successfully started on destination or not",
        )
        await ctx.jobs.end(job)
        return
    await phases.confirm(ctx, job, cancelled=True, cookie=b"")


def recover_source_jobs(ctx: SourceContext) -> int:
    """Adopt the journal's source records and settle them in the background."""
    jobs = adopt_source_jobs(ctx)
    for job in jobs:
        ctx.spawn(_settle_logged(ctx, job))
    return len(jobs)


async def _settle_logged(ctx: SourceContext, job: SourceJob) -> None:
    try:
        await settle(ctx, job)
    except VmmigrateError as exc:
        log.error("source_job_recovery_failed", migration_id=job.migration_id, error=str(exc))


async def expire_parked(ctx: SourceContext) -> None:
    """Client-driven jobs whose client went away (idle, or past their deadline): settle
    them like a crashed srcd's (libvirt aborts them when the client's connection closes)."""
    # a client-driven Finish is asked for up to 30 s (migctl), then the client gives up
    done_timeout = 2 * ctx.config.rpc_timeout + 5.0
    for job in ctx.jobs.stale(ctx.config.job_idle_timeout, done_timeout):
        log.warning("job_expired", migration_id=job.migration_id, phase=job.phase.label)
        job.driven = True
        ctx.spawn(_settle_logged(ctx, job))
