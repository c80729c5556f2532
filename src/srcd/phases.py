"""The source phases: Begin, Perform, Confirm (libvirt's qemuMigrationSrc*Phase).

One function per phase variant; the p2p driver (p2p.py) and the client-driven RPCs
(server.py) both call these, so both modes behave the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable

import structlog
from vmmigrate.common import events
from vmmigrate.common.cookie import (
    ACCEPT_CONFIRM,
    CookieFlag,
    MigrationCookie,
    format_cookie,
    parse_cookie,
)
from vmmigrate.common.disks import (
    check_migrate_disks,
    check_migration_safe,
    check_storage_copy,
    domain_disks,
)
from vmmigrate.common.domainxml import DomainDef, check_abi_stable, parse_domain, rename
from vmmigrate.common.errors import (
    JobActive,
    OperationInvalid,
    PeerUnavailable,
    Timeout,
    VmmigrateError,
)
from vmmigrate.common.flags import MigrateFlag, check_begin_flags
from vmmigrate.common.hypervisor import RunState, RuntimeRecord
from vmmigrate.common.phase import Phase
from vmmigrate.common.rpc import Deadline
from vmmigrate.common.store import JobLock, JobRecord, Role, validate_migration_id
from vmmigrate.srcd.context import SourceContext
from vmmigrate.srcd.jobs import JobOutcome, SourceJob, SourceParams
from vmmigrate.srcd.storage import CopiedDisk, begin_nbd, plan_copies, with_backing_stores

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.phases")


@dataclasses.dataclass(frozen=True)
class BeginResult:
    cookie: bytes
    domain_xml: str
    flags: MigrateFlag


def _definition_to_send(ctx: SourceContext, current: DomainDef, params: SourceParams) -> DomainDef:
    """What Prepare receives: the stored definition, or DEST_XML after libvirt's identity
    check. It always carries the source name: renaming is DEST_NAME's job, on the
    destination, so that the cookie's name (the source's) and the XML's agree."""
    if not params.dest_xml:
        return current
    new = parse_domain(params.dest_xml, max_bytes=ctx.config.max_xml_bytes, generate_uuid=False)
    if params.dest_name and new.name == params.dest_name:
        new = rename(new, current.name)
    check_abi_stable(current, new, new_name=None)
    return new


def _check_persist_xml(ctx: SourceContext, current: DomainDef, params: SourceParams) -> None:
    if not params.persist_xml:
        return
    new = parse_domain(params.persist_xml, max_bytes=ctx.config.max_xml_bytes, generate_uuid=False)
    if params.dest_name and new.name == params.dest_name:
        return check_abi_stable(current, new, new_name=params.dest_name)
    return check_abi_stable(current, new, new_name=None)


@dataclasses.dataclass(frozen=True)
class _Begin:
    """What Begin's variants share: the request, and what begin() took (the domain's job
    lock, an outgoing slot) on the stack that gives them back if Begin fails."""

    migration_id: str
    current: DomainDef
    flags: MigrateFlag
    params: SourceParams
    peer: str
    deadline: Deadline
    driven: bool
    lock: JobLock
    stack: contextlib.AsyncExitStack


async def begin(
    ctx: SourceContext,
    *,
    migration_id: str,
    domain_key: str,
    flags: MigrateFlag,
    params: SourceParams,
    peer: str,
    deadline: Deadline,
    driven: bool,
    queue_wait: float | None = None,
) -> tuple[SourceJob, BeginResult]:
    """Begin: take the domain's migration job and produce the XML and cookie for Prepare;
    dispatches to its variant (begin_offline, begin_live).

    On success the job is held (lock, journal record at BEGIN3, table entry) until
    ctx.jobs.end(). On failure nothing is left behind.
    """
    validate_migration_id(migration_id)
    current, _ = ctx.lookup(domain_key)
    async with contextlib.AsyncExitStack() as stack:
        lock = ctx.store.acquire_job(current)  # an flock, no fsync
        stack.callback(lock.release)
        # the host limit: wait for an outgoing slot (the domain's job is already ours, so
        # a second migration of it is refused at once rather than queued)
        await ctx.outgoing.acquire(deadline.remaining() if queue_wait is None else queue_wait)
        stack.callback(ctx.outgoing.release)
        start = _Begin(migration_id, current, flags, params, peer, deadline, driven, lock, stack)
        variant = begin_offline if MigrateFlag.OFFLINE in flags else begin_live
        job, result = await variant(ctx, start)
    ctx.jobs.add(job)
    log.debug("phase_begin_done", migration_id=migration_id, domain=job.domain.name)
    return job, result


def _running_definition(runtime: RuntimeRecord, current: DomainDef) -> DomainDef:
    """What is sent is the running definition (libvirt: the live def, also offline)."""
    if not runtime.xml:
        return current
    return parse_domain(runtime.xml, generate_uuid=False, max_bytes=len(runtime.xml.encode()) + 1)


async def begin_offline(ctx: SourceContext, start: _Begin) -> tuple[SourceJob, BeginResult]:
    """Offline Begin: the definition, also of a running domain (which stays untouched)."""
    # libvirt checks, in its order: the job, then the flag rules.
    check_begin_flags(start.flags)
    current, was_running = start.current, False
    check_migrate_disks(domain_disks(current), start.flags, start.params.migrate_disks)
    runtime = ctx.hypervisor.record(current.uuid)
    if runtime is not None:
        current = _running_definition(runtime, current)
        was_running = await ctx.hypervisor.status(current.uuid) == RunState.RUNNING
    # Offline, the record need not survive a power cut: the source changes only in
    # Confirm (--undefinesource, itself durable), after the destination persisted its
    # copy, so without the record the domain is at worst defined on both hosts, never
    # lost. It still survives a crash of srcd itself (the page cache does).
    return await _take_job(ctx, start, current, start.flags, was_running, durable=False)


async def begin_live(ctx: SourceContext, start: _Begin) -> tuple[SourceJob, BeginResult]:
    """Live Begin: the domain must run here; a paused one stays paused (PAUSED)."""
    # libvirt checks, in its order: the job, then "domain is not running", then the flag
    # rules.
    runtime = ctx.hypervisor.record(start.current.uuid)
    if runtime is None:
        raise OperationInvalid("domain is not running")
    current = _running_definition(runtime, start.current)
    # libvirt's order: the safety check before the flag rules, the disk rules after them
    disks = domain_disks(current)
    check_migration_safe(disks, start.flags, start.params.migrate_disks)
    check_begin_flags(start.flags)
    check_migrate_disks(disks, start.flags, start.params.migrate_disks)
    check_storage_copy(start.flags, runtime.emulator)
    flags = start.flags
    # storage copy: the disks to copy and their sizes, from the running emulator
    copies = await plan_copies(ctx.hypervisor, current, flags, start.params.migrate_disks)
    was_running = await ctx.hypervisor.status(current.uuid) == RunState.RUNNING
    if not was_running:
        flags |= MigrateFlag.PAUSED  # libvirt: a paused domain stays paused
    # Live: a restarted srcd must find the record to resume or stop the source.
    return await _take_job(ctx, start, current, flags, was_running, durable=True, copies=copies)


async def _take_job(
    ctx: SourceContext,
    start: _Begin,
    current: DomainDef,
    flags: MigrateFlag,
    was_running: bool,
    *,
    durable: bool,
    copies: tuple[CopiedDisk, ...] = (),
) -> tuple[SourceJob, BeginResult]:
    """Begin's common end: check what is sent, journal the job at BEGIN3, build the job
    and the cookie for Prepare."""
    to_send = with_backing_stores(_definition_to_send(ctx, current, start.params), flags, copies)
    _check_persist_xml(ctx, current, start.params)
    now = time.time()
    record = JobRecord(
        migration_id=start.migration_id,
        role=Role.SOURCE,
        domain_name=current.name,
        domain_uuid=current.uuid,
        phase=Phase.BEGIN3.label,
        flags=int(flags),
        peer=start.peer,
        dest_name=start.params.dest_name,
        started_unix=now,
        updated_unix=now,
        was_running=was_running,
    )
    if durable:
        await asyncio.to_thread(ctx.store.journal_put, record)
    else:  # no flush, but off the event loop (groupcommit.offloader)
        await ctx.offload.submit(functools.partial(ctx.store.journal_put, record, durable=False))
    # a finished job's record may harmlessly come back after a crash: no fsync
    start.stack.push_async_callback(
        ctx.offload.submit,
        functools.partial(ctx.store.journal_remove, start.migration_id, durable=False),
    )
    await ctx.failpoints.hit("srcd.begin.after_journal")
    identity = ctx.store.identity
    cookie = MigrationCookie(
        name=current.name,
        uuid=current.uuid,
        hostname=identity.hostname,
        hostuuid=identity.host_uuid,
        features=CookieFlag.LOCKSTATE,
        nbd=begin_nbd(flags, copies),
    )
    job = SourceJob(
        migration_id=start.migration_id,
        domain=current,
        flags=flags,
        params=start.params,
        peer=start.peer,
        deadline=start.deadline,
        record=record,
        lock=start.lock,
        cleanup=start.stack.pop_all(),
        driven=start.driven,
        was_running=was_running,
        copies=copies,
    )
    return job, BeginResult(cookie=format_cookie(cookie), domain_xml=to_send.xml, flags=flags)


async def _enter_confirm(
    ctx: SourceContext, job: SourceJob, cancelled: bool, cookie: bytes
) -> None:
    job.advance(Phase.CONFIRM3_CANCELLED if cancelled else Phase.CONFIRM3)
    if not job.offline and not job.peer:
        # Live: a crash from here on must kill (CONFIRM3) or resume (CONFIRM3_CANCELLED)
        # the source on restart. With a destination to ask, the record need not survive a
        # power cut: a restarted srcd that finds the job at an earlier phase asks the
        # destination, which answers as its Finish did (kept on its disk), and confirms
        # the same way (srcd/recovery.py); a crash of srcd alone keeps it (page cache).
        # Offline needs no record of it: an offline job found at BEGIN3 after a crash is
        # settled by asking the destination about Finish.
        await asyncio.to_thread(ctx.store.journal_put, job.record)
    elif not job.offline:
        ctx.store.journal_put(job.record, durable=False)
    if cookie:
        parse_cookie(
            cookie,
            accept=ACCEPT_CONFIRM,
            local_hostuuid=ctx.store.identity.host_uuid,
            expect_uuid=job.domain.uuid,
        )


async def confirm_offline(
    ctx: SourceContext, job: SourceJob, *, cancelled: bool, cookie: bytes
) -> None:
    """Confirm of an offline migration (the caller ends the job).

    Success with UNDEFINE_SOURCE removes the source definition, but only while the domain is
    inactive (libvirt's rule: a running source is never touched by an offline migration).
    Cancelled: nothing to undo (offline never changed the source).
    """
    await ctx.failpoints.hit("srcd.confirm.before")
    await _enter_confirm(ctx, job, cancelled, cookie)
    if (
        not cancelled
        and MigrateFlag.UNDEFINE_SOURCE in job.flags
        and not ctx.is_active(job.domain)
        and ctx.store.find(job.domain.uuid) is not None  # a retry: it may be gone already
    ):
        await ctx.failpoints.hit("srcd.confirm.before_undefine")
        # group commit: concurrent Confirms' removals share one flush (durable on return)
        await ctx.undefines.submit((job.domain.uuid, job.lock))
        log.debug("source_undefined", migration_id=job.migration_id, domain=job.domain.name)
        ctx.obs.events.emit(job.domain.name, job.domain.uuid, events.UNDEFINED_REMOVED)
        await ctx.failpoints.hit("srcd.confirm.after_undefine")
    await ctx.failpoints.hit("srcd.confirm.after")
    ctx.ended.add(job.migration_id, cancelled)


async def confirm_live(
    ctx: SourceContext, job: SourceJob, *, cancelled: bool, cookie: bytes
) -> None:
    """Confirm of a live migration (the caller ends the job).

    Success: the domain runs on the destination now; the source emulator quits, and with
    UNDEFINE_SOURCE the source definition goes. Cancelled: the source resumes if it was
    running before the migration (QEMU leaves it paused once the stream completed).
    """
    uuid = job.domain.uuid
    try:
        await ctx.failpoints.hit("srcd.confirm.before")
        await _enter_confirm(ctx, job, cancelled, cookie)
        if cancelled:
            status = await ctx.hypervisor.status(uuid)
            if job.was_running and status not in (RunState.RUNNING, RunState.SHUTOFF):
                await ctx.hypervisor.execute(uuid, "cont")
                log.info("source_resumed", migration_id=job.migration_id, domain=job.domain.name)
                ctx.obs.events.emit(job.domain.name, uuid, events.RESUMED_MIGRATED)
        else:
            await ctx.hypervisor.stop_migrated(uuid)
            log.info("source_stopped", migration_id=job.migration_id, reason="migrated")
            ctx.obs.events.emit(job.domain.name, uuid, events.STOPPED_MIGRATED)
            undefine = MigrateFlag.UNDEFINE_SOURCE in job.flags
            if undefine and await asyncio.to_thread(ctx.store.find, uuid) is not None:
                await ctx.failpoints.hit("srcd.confirm.before_undefine")
                await asyncio.to_thread(ctx.store.undefine, uuid, job.lock)
                log.info("source_undefined", migration_id=job.migration_id)
                ctx.obs.events.emit(job.domain.name, uuid, events.UNDEFINED_REMOVED)
                await ctx.failpoints.hit("srcd.confirm.after_undefine")
        await ctx.failpoints.hit("srcd.confirm.after")
        ctx.ended.add(job.migration_id, cancelled)
    finally:
        job.outcome = job.outcome or (JobOutcome.CANCELLED if cancelled else JobOutcome.COMPLETED)
        ctx.completed_jobs[uuid] = job.completed()


async def confirm(ctx: SourceContext, job: SourceJob, *, cancelled: bool, cookie: bytes) -> None:
    """Dispatch Confirm to its variant; the job ends when it succeeds.

    A Confirm that fails (the undefine or the emulator did not do as told) is not given
    up: the job stays held and Confirm is run again in the background until it succeeds,
    so that the source ends as the destination's outcome says (never defined or running
    on both hosts); the error is still reported."""
    try:
        await _confirm_variant(job)(ctx, job, cancelled=cancelled, cookie=cookie)
    except VmmigrateError as exc:
        log.error(
            "confirm_failed_will_retry",
            migration_id=job.migration_id,
            cancelled=cancelled,
            error=str(exc),
        )
        _retry_confirm(ctx, job, cancelled)
        raise
    await ctx.jobs.end(job)


def _confirm_variant(job: SourceJob) -> Callable[..., Awaitable[None]]:
    return confirm_offline if job.offline else confirm_live


def _retry_confirm(ctx: SourceContext, job: SourceJob, cancelled: bool) -> None:
    job.driven = True  # held by this task now, not by a client

    async def again() -> None:
        delay = 0.2
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            try:
                # the cookie was checked (or refused) the first time; effects only now
                await _confirm_variant(job)(ctx, job, cancelled=cancelled, cookie=b"")
            except VmmigrateError as exc:
                log.warning("confirm_retry_failed", migration_id=job.migration_id, error=str(exc))
                continue
            log.info("confirm_retry_succeeded", migration_id=job.migration_id)
            await ctx.jobs.end(job)
            return

    ctx.spawn(again())


AskFinish = Callable[[], Awaitable[pb.FinishResponse]]


def settle_later(ctx: SourceContext, job: SourceJob, ask: AskFinish) -> asyncio.Task[None]:
    """Settle a job whose Finish outcome is unknown (the answer was lost with the link, or
    srcd restarted, or the client went away): the job stays held, and a live source stays
    paused, never resumed blindly (it may run on the destination now), while the
    destination is asked again, in the background, until it answers: a domain there ->
    Confirm success (the source stops, --undefinesource applies); none -> Confirm
    cancelled (a live source resumes). Beyond libvirt, which leaves such a domain paused
    for a human."""
    job.driven = True  # not a parked client job: no idle expiry
    log.warning(
        "finish_outcome_unknown",
        migration_id=job.migration_id,
        domain=job.domain.name,
        phase=job.phase.label,
    )

    async def settle() -> None:
        delay = 0.2
        while True:
            try:
                finished = await ask()
            except (PeerUnavailable, Timeout, JobActive):  # JobActive: a Finish still runs
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except VmmigrateError as exc:
                # the destination knows nothing of it any more: it never ran it
                log.warning("finish_outcome_refused", migration_id=job.migration_id, error=str(exc))
                finished = pb.FinishResponse()
            break
        cancelled = not finished.HasField("domain")
        log.info("finish_outcome_settled", migration_id=job.migration_id, cancelled=cancelled)
        try:
            await confirm(ctx, job, cancelled=cancelled, cookie=finished.cookie)
        except VmmigrateError as exc:
            log.error("confirm_failed", migration_id=job.migration_id, error=str(exc))

    return ctx.spawn(settle())


async def abandon(ctx: SourceContext, job: SourceJob) -> None:
    """End a job whose Prepare failed: libvirt restores the domain and ends the job, with no
    Finish and no Confirm. Offline changed nothing, so there is nothing to restore."""
    await ctx.jobs.end(job)
