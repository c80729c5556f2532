"""The destination phases: Prepare and Finish (libvirt's qemuMigrationDst*).

One function per phase variant (prepare_offline / prepare_live, finish_offline /
finish_live); the dispatch is at the top (prepare, finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator

import structlog
from vmmigrate.common import events
from vmmigrate.common.config import format_hostport, parse_hostport
from vmmigrate.common.cookie import (
    ACCEPT_FINISH,
    ACCEPT_PREPARE,
    MigrationCookie,
    Nbd,
    format_cookie,
    parse_cookie,
)
from vmmigrate.common.disks import (
    STORAGE_COPY,
    check_migration_safe,
    check_storage_copy,
    domain_disks,
)
from vmmigrate.common.domainxml import DomainDef, check_abi_stable, parse_domain, rename
from vmmigrate.common.errors import (
    HostBusy,
    InvalidArgument,
    JobActive,
    NoDomain,
    OperationFailed,
    OperationInvalid,
)
from vmmigrate.common.flags import MigrateFlag, check_prepare_flags
from vmmigrate.common.hostcheck import check_runnable
from vmmigrate.common.hypervisor import emulator_kind
from vmmigrate.common.phase import Phase, require
from vmmigrate.common.qmp import QMPError
from vmmigrate.common.rpc import Deadline
from vmmigrate.common.store import (
    OUTCOME_CANCELLED,
    OUTCOME_FINISHED,
    JobRecord,
    MigrationOutcome,
    Role,
    validate_migration_id,
)
from vmmigrate.dstd import storage
from vmmigrate.dstd.context import DestinationContext
from vmmigrate.dstd.incoming import IncomingJob

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.dstd.phases")

INCOMING_POLL = 0.005  # seconds between query-status calls when the emulator sends no events


@dataclasses.dataclass(frozen=True)
class PrepareInput:
    migration_id: str
    flags: MigrateFlag
    cookie: bytes
    domain_xml: str
    dest_name: str
    persist_xml: str
    deadline: Deadline
    peer: str


def _reply_cookie(
    ctx: DestinationContext, origname: str, uuid: str, nbd: Nbd | None = None
) -> bytes:
    identity = ctx.store.identity
    return format_cookie(
        MigrationCookie(
            name=origname,
            uuid=uuid,
            hostname=identity.hostname,
            hostuuid=identity.host_uuid,
            nbd=nbd,
        )
    )


def _definitions(ctx: DestinationContext, req: PrepareInput) -> tuple[DomainDef, DomainDef]:
    """(the definition received, the one to persist: PERSIST_XML if given), not renamed."""
    if not req.domain_xml:
        raise InvalidArgument("no domain XML passed")
    received = parse_domain(req.domain_xml, max_bytes=ctx.config.max_xml_bytes, generate_uuid=False)
    persist = received
    if req.persist_xml:
        # libvirt ignores persistent_xml for offline migration (Finish gets no cookie); we
        # honour it, because an operator who passes it expects it to be what is defined.
        persist = parse_domain(
            req.persist_xml, max_bytes=ctx.config.max_xml_bytes, generate_uuid=False
        )
        new_name = req.dest_name if persist.name == req.dest_name else None
        check_abi_stable(received, persist, new_name=new_name)
    # before anything is reserved or started: both would run here (one now, one when
    # started again), so both must be what this host allows
    for d in (received,) if persist is received else (received, persist):
        ctx.hypervisor.check_definition(d)
    return received, persist


def _renamed(d: DomainDef, dest_name: str) -> DomainDef:
    return rename(d, dest_name) if dest_name else d


def migration_host(ctx: DestinationContext) -> str:
    """Where incoming emulators listen: --migration-address, else dstd's own address."""
    host = ctx.config.migration_address
    if not host:
        host, _ = parse_hostport(ctx.config.listen, 0)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
    if host.startswith("localhost"):
        raise OperationInvalid(
            "hostname on destination resolved to localhost, but migration requires an FQDN"
        )
    return host


async def prepare(
    ctx: DestinationContext, req: PrepareInput, *, tunnel_rpc: bool = False
) -> pb.PrepareResponse:
    """Prepare: validate, reserve the name and UUID, and for a live migration start the
    incoming emulator; answer with a cookie and the URI to send the stream to.

    On failure nothing is left: no reservation, no emulator, no port. On success the incoming
    job holds them until Finish, or until its deadline passes without one.
    """
    # (the id checks ran in prepare_once, before the retry lookup)
    # libvirt's PrepareAny order: the offline trio first, then post-copy, then the rest.
    check_prepare_flags(req.flags)
    tunnelled = MigrateFlag.TUNNELLED in req.flags
    if tunnelled and not tunnel_rpc:
        raise OperationInvalid("Tunnelled migration requested but invalid RPC method called")
    if tunnel_rpc and not tunnelled:
        raise OperationInvalid("PrepareTunnel called but no TUNNELLED flag set")
    if req.migration_id in ctx.incoming:
        raise OperationInvalid(f"migration id '{req.migration_id}' is already in use")
    limit = ctx.config.max_incoming
    if limit and len(ctx.incoming) >= limit:
        raise HostBusy(
            f"too many incoming migrations on this host ({len(ctx.incoming)}, "
            f"max_incoming {limit}): try again later"
        )
    if MigrateFlag.OFFLINE in req.flags:
        return await prepare_offline(ctx, req)
    return await prepare_live(ctx, req)


def check_not_ended(ctx: DestinationContext, migration_id: str) -> None:
    if ctx.results.known(migration_id):
        raise OperationInvalid(f"migration '{migration_id}' has already ended")


def require_migration_id(migration_id: str) -> str:
    if not migration_id:
        raise InvalidArgument("missing migration id")
    return migration_id


async def prepare_once(
    ctx: DestinationContext, req: PrepareInput, *, tunnel_rpc: bool, fingerprint: str
) -> pb.PrepareResponse:
    """Prepare, asked once per migration id: a retry of the same request (its answer was
    lost) gets the first answer, and the work is done once. The id is checked, and an
    ended migration refused, before the answer is looked up: a Prepare retried while its
    Finish runs must not get the stale answer."""
    validate_migration_id(req.migration_id)
    check_not_ended(ctx, req.migration_id)
    answers = ctx.prepares
    if req.migration_id in answers and req.migration_id not in ctx.incoming:
        answers.forget(req.migration_id)  # its job ended: the answer is stale

    async def first() -> pb.PrepareResponse:
        try:
            return await prepare(ctx, req, tunnel_rpc=tunnel_rpc)
        except BaseException:
            answers.forget(req.migration_id)  # a failed Prepare may be tried again
            raise

    return await answers.run_once(req.migration_id, first, fingerprint=fingerprint)


def _check_cookie(
    ctx: DestinationContext, req: PrepareInput, received: DomainDef
) -> MigrationCookie:
    return parse_cookie(
        req.cookie,
        accept=ACCEPT_PREPARE,
        local_hostuuid=ctx.store.identity.host_uuid,
        expect_name=received.name,
        expect_uuid=received.uuid,
    )


def _record(req: PrepareInput, received: DomainDef, target: DomainDef) -> JobRecord:
    now = time.time()
    return JobRecord(
        source_name=received.name,
        migration_id=req.migration_id,
        role=Role.DESTINATION,
        domain_name=target.name,
        domain_uuid=target.uuid,
        phase=Phase.PREPARE.label,
        flags=int(req.flags),
        peer=req.peer,
        xml=target.xml,
        dest_name=req.dest_name,
        started_unix=now,
        updated_unix=now,
    )


@contextlib.asynccontextmanager
async def _reserved(
    ctx: DestinationContext, req: PrepareInput, received: DomainDef, target: DomainDef
) -> AsyncIterator[IncomingJob]:
    """Reserve the name and UUID for an incoming job; the reservation (and whatever the
    block adds to the job) is given back if the block fails."""
    record = _record(req, received, target)
    await ctx.failpoints.hit("dstd.prepare.before_reserve")
    async with contextlib.AsyncExitStack() as undo:
        replaces = ctx.store.reserve_incoming(record)  # not fsync'd: no thread hand-off
        job = IncomingJob(
            migration_id=req.migration_id,
            target=target,
            origname=received.name,
            flags=req.flags,
            record=record,
            deadline=req.deadline,
            replaces=replaces,
        )
        ctx.incoming.add(job)
        undo.callback(job.prepared.set)
        undo.push_async_callback(ctx.incoming.drop, job)
        await ctx.failpoints.hit("dstd.prepare.after_reserve")
        yield job
        undo.pop_all()
        job.prepared.set()


async def prepare_offline(ctx: DestinationContext, req: PrepareInput) -> pb.PrepareResponse:
    received, persist = _definitions(ctx, req)
    target = _renamed(persist, req.dest_name)
    _check_cookie(ctx, req, received)
    async with _reserved(ctx, req, received, target) as job:
        pass  # offline starts nothing and needs no port: the URI stays empty
    log.info(
        "incoming_prepared",
        migration_id=req.migration_id,
        domain=target.name,
        replaces=job.replaces,
    )
    return pb.PrepareResponse(cookie=_reply_cookie(ctx, received.name, received.uuid), uri="")


PORT_ATTEMPTS = 4  # incoming emulators started on another port after losing a port race


async def _start_incoming(ctx: DestinationContext, job: IncomingJob, running: DomainDef) -> str:
    """Start the incoming emulator on a migration port; returns its incoming URI.

    The port range may overlap the kernel's ephemeral ports, so an outgoing connection can
    take a port between the allocator's check and the emulator's bind: then the next free
    port is tried (the lost one stays out of the allocator until this ends)."""
    lost: list[int] = []
    try:
        while True:
            job.port = await asyncio.to_thread(ctx.ports.acquire, job.host)
            incoming = f"tcp:{format_hostport(job.host, job.port)}"
            try:
                await ctx.hypervisor.start(running, paused=True, incoming=incoming)
                return incoming
            except OperationFailed as exc:
                if "Address already in use" not in str(exc) or len(lost) + 1 >= PORT_ATTEMPTS:
                    raise
                log.warning("migration_port_taken", migration_id=job.migration_id, port=job.port)
                lost.append(job.port)
                job.port = 0
    finally:
        for port in lost:
            ctx.ports.release(port)


async def _start_live(ctx: DestinationContext, job: IncomingJob, running: DomainDef) -> str:
    """Start the incoming emulator, paused; returns its incoming URI."""
    if job.tunnelled:
        # The stream arrives through dstd itself: the emulator listens on a unix socket
        # in this host's private socket directory, unreachable from the network, and
        # whose small kernel buffer keeps little of the stream waiting in front of it
        # when the source switches over (the guest is paused until it is all in).
        job.path = str(ctx.hypervisor.socket_dir / f"{running.uuid}.incoming")
        incoming = f"unix:{job.path}"
        await ctx.hypervisor.start(running, paused=True, incoming=incoming)
    else:
        job.host = migration_host(ctx)
        incoming = await _start_incoming(ctx, job, running)
    job.emulator_started = True
    with contextlib.suppress(QMPError):  # else Finish turns them on, or polls
        await ctx.hypervisor.migration_events(running.uuid)
    return incoming


async def prepare_live(ctx: DestinationContext, req: PrepareInput) -> pb.PrepareResponse:
    received, persist = _definitions(ctx, req)
    target = _renamed(persist, req.dest_name)
    running = _renamed(received, req.dest_name)
    cookie = _check_cookie(ctx, req, received)
    # storage copy: the disks the source copies (target -> capacity), as its cookie says
    copied = storage.copied_capacities(cookie.nbd, req.flags)
    # the disks of the XML this host will run (DEST_XML may differ from the source's), and
    # storage copy refused for its emulator, before anything is reserved or started
    safety_flags = req.flags if copied else req.flags & ~STORAGE_COPY
    check_migration_safe(domain_disks(received), safety_flags, tuple(copied))
    check_storage_copy(req.flags, emulator_kind(received, ctx.hypervisor.settings.default))
    disks = storage.plan_disks(running, cookie.nbd, req.flags, ctx.config.storage_dirs)
    await asyncio.to_thread(check_runnable, running, ctx.hypervisor.settings, copied=copied)
    async with _reserved(ctx, req, received, target) as job:
        if ctx.hypervisor.record(target.uuid) is not None:
            raise OperationInvalid(f"domain '{target.name}' is already active")
        await storage.create_disks(ctx, job, disks)
        await ctx.failpoints.hit("dstd.prepare.after_create")
        incoming = await _start_live(ctx, job, running)
        nbd = await storage.start_nbd(ctx, job, disks)
        await ctx.failpoints.hit("dstd.prepare.after_start")
    log.info(
        "incoming_prepared",
        migration_id=req.migration_id,
        domain=target.name,
        uri=incoming,
        tunnelled=job.tunnelled,
        copied=list(copied) or None,
    )
    return pb.PrepareResponse(
        cookie=_reply_cookie(ctx, received.name, received.uuid, nbd),
        uri="" if job.tunnelled else incoming,
    )


def _early_finish_answer(
    ctx: DestinationContext, migration_id: str, dest_name: str, cancelled: bool
) -> pb.FinishResponse | None:
    """Finish's checks before it touches a job, and its answer when there is no job to
    finish; None: run it (or get the answer of the Finish that runs)."""
    require_migration_id(migration_id)
    if not dest_name:
        raise NoDomain("missing domain name")
    if migration_id not in ctx.incoming and migration_id not in ctx.results:
        ended = ctx.results.ended(migration_id)
        if ended is not None:
            return answer_for(ctx, ended)
        if cancelled:
            # A source that could not learn whether its Prepare arrived cancels it
            # blindly: remember the id, so that a Prepare delivered late (a TCP
            # retransmission after a partition) is refused instead of reserving.
            ctx.results.tombstone(migration_id)
            return pb.FinishResponse()
        raise OperationInvalid(f"domain '{dest_name}' is not processing incoming migration")
    job = ctx.incoming.find(migration_id)
    if job is not None and job.target.name != dest_name:
        # Refused before it touches the job: not an answer to keep for retries, or the
        # right Finish (or the source's cancel) would get this error and never run.
        raise NoDomain(f"no domain with matching name '{dest_name}'")
    return None


async def finish_once(
    ctx: DestinationContext, migration_id: str, dest_name: str, cancelled: bool, cookie: bytes
) -> pb.FinishResponse:
    """Finish, run once per migration id: it runs to its end once started (a client that
    goes away half-way must not leave a reservation, an emulator or a half-done persist
    behind), and a retry of it gets the first answer."""
    early = _early_finish_answer(ctx, migration_id, dest_name, cancelled)
    if early is not None:
        return early
    return await ctx.results.run_once(
        migration_id, lambda: finish(ctx, migration_id, dest_name, cancelled, cookie)
    )


async def finish(
    ctx: DestinationContext, migration_id: str, dest_name: str, cancelled: bool, cookie: bytes
) -> pb.FinishResponse:
    """Finish (after finish_once's checks): dispatch to its variant. The incoming job
    always ends here."""
    job = ctx.incoming.get(migration_id, dest_name)
    # A Finish (a blind cancel, a restarted source asking) may overtake its Prepare, still
    # starting the emulator: wait for it, or Prepare would go on for a job that has ended
    await job.prepared.wait()
    if ctx.incoming.find(migration_id) is not job:  # Prepare failed: the job is gone
        if cancelled:
            return pb.FinishResponse()
        raise OperationInvalid(f"domain '{dest_name}' is not processing incoming migration")
    return await _finish_job(ctx, job, cancelled, cookie)


def _finish_running(job: IncomingJob) -> JobActive:
    # JobActive, not a failure: the source asks again and gets this Finish's answer
    return JobActive(f"Finish of migration '{job.migration_id}' is already running")


@require(Phase.PREPARE, refuse=_finish_running)
async def _finish_job(
    ctx: DestinationContext, job: IncomingJob, cancelled: bool, cookie: bytes
) -> pb.FinishResponse:
    migration_id = job.migration_id
    job.busy = True
    try:
        await ctx.failpoints.hit("dstd.finish.before")
        job.advance(Phase.FINISH3)
        if job.offline:
            return await finish_offline(ctx, job, cancelled)
        return await finish_live(ctx, job, cancelled, cookie)
    except Exception as exc:
        ended = ctx.results.ended(migration_id)
        if ended is not None and ended.outcome == OUTCOME_FINISHED:
            # past the commit point (the outcome is on disk): the answer is the domain,
            # whatever failed afterwards; a retry or a restarted dstd says the same
            log.error("finish_failed_after_commit", migration_id=migration_id, error=str(exc))
            return answer_for(ctx, ended)
        # the answer is an error: no domain here (a retry gets the same error; a
        # restarted dstd answers "no domain"); the job ends (if the variant had not run)
        if ended is None:
            _remember_cancelled(ctx, migration_id)
        job.result, job.error = job.result or "failed", job.error or str(exc)
        await ctx.incoming.drop(job)
        raise
    finally:
        job.busy = False


async def _undo_persist(ctx: DestinationContext, job: IncomingJob) -> None:
    """A Finish failed after persisting: take the definition back (before the
    reservation goes)."""
    if job.undo_persist is None:
        return
    if ctx.results.ended(job.migration_id) is not None:
        return  # it had finished: the answer stands
    try:
        await asyncio.to_thread(job.undo_persist)
    except Exception as exc:  # the disk may be what failed: say so, keep the error
        log.error("incoming_persist_undo_failed", migration_id=job.migration_id, error=str(exc))
    job.undo_persist = None


def _remember_cancelled(ctx: DestinationContext, migration_id: str) -> None:
    """Not durable: a migration id a restarted dstd does not know is answered as
    cancelled anyway. Best effort: the disk may be what failed."""
    with contextlib.suppress(Exception):
        ctx.store.outcome_put(
            MigrationOutcome(migration_id=migration_id, outcome=OUTCOME_CANCELLED),
            durable=False,
        )


def cancelled_answer(ctx: DestinationContext, job: IncomingJob) -> pb.FinishResponse:
    log.info("incoming_cancelled", migration_id=job.migration_id)
    job.result = "cancelled"
    _remember_cancelled(ctx, job.migration_id)
    return pb.FinishResponse()


async def finished_answer(
    ctx: DestinationContext, job: IncomingJob, active: bool
) -> pb.FinishResponse:
    """Remember, durably, that the migration finished here, then build the answer: from
    here on, the source is told the domain is here, even by a restarted dstd."""
    outcome = MigrationOutcome(
        migration_id=job.migration_id,
        outcome=OUTCOME_FINISHED,
        domain_name=job.target.name,
        domain_uuid=job.target.uuid,
        origname=job.origname,
        active=active,
    )
    # group commit: concurrent Finishes' outcomes share one flush (durable on return)
    await ctx.outcome_commits.submit(outcome)
    job.result = "completed"
    return answer_for(ctx, outcome)


def answer_for(ctx: DestinationContext, outcome: MigrationOutcome) -> pb.FinishResponse:
    """Finish's answer for a migration that ended (also after a restart of dstd)."""
    if outcome.outcome != OUTCOME_FINISHED:
        return pb.FinishResponse()
    return pb.FinishResponse(
        domain=pb.DomainRef(
            name=outcome.domain_name, uuid=outcome.domain_uuid, id=1 if outcome.active else -1
        ),
        cookie=_reply_cookie(ctx, outcome.origname, outcome.domain_uuid),
    )


async def _persist(ctx: DestinationContext, job: IncomingJob) -> None:
    await ctx.failpoints.hit("dstd.finish.before_persist")

    # group commit: concurrent Finishes' definitions are written with one flush (durable
    # on return); previous: what it replaced, looked up under the same store lock
    previous, replaced = await ctx.persists.submit((job.migration_id, job.target))
    # A Finish that fails after this point must not leave the definition here: the source
    # keeps its own when Finish fails (the domain would be defined on both hosts).
    job.undo_persist = lambda: ctx.store.unpersist_incoming(job.migration_id, previous)
    await ctx.failpoints.hit("dstd.finish.after_persist")
    kind = events.DEFINED_UPDATED if replaced else events.DEFINED_ADDED
    ctx.obs.events.emit(job.target.name, job.target.uuid, kind)
    log.debug(
        "incoming_persisted",
        migration_id=job.migration_id,
        domain=job.target.name,
        libvirt_event="DEFINED",
        detail="UPDATED" if replaced else "ADDED",
    )


async def finish_offline(
    ctx: DestinationContext, job: IncomingJob, cancelled: bool
) -> pb.FinishResponse:
    """Offline Finish: persist the definition durably, and only then answer with a domain.

    cancelled: drop the reservation, return no domain. Any failure: drop the reservation and
    report the error; the store never holds a half-written config (atomic write).
    """
    try:
        if cancelled:
            return cancelled_answer(ctx, job)
        await _persist(ctx, job)
        answer = await finished_answer(ctx, job, active=False)
        await ctx.failpoints.hit("dstd.finish.after_outcome")
        return answer
    except BaseException:
        await _undo_persist(ctx, job)
        raise
    finally:
        await ctx.incoming.drop(job)
        await ctx.failpoints.hit("dstd.finish.after")


async def _wait_incoming_done(ctx: DestinationContext, job: IncomingJob) -> None:
    """Wait until the incoming emulator has the whole stream (it leaves "inmigrate"): on
    its QMP events, so that the paused guest resumes as soon as possible (see
    QMPHypervisor.wait_incoming)."""
    uuid = job.target.uuid
    limit = time.monotonic() + max(job.deadline.remaining(), ctx.config.rpc_timeout)
    if ctx.hypervisor.record(uuid) is None:
        raise OperationFailed("guest unexpectedly quit")
    try:
        status = await ctx.hypervisor.wait_incoming(uuid, limit, INCOMING_POLL)
    except QMPError as exc:
        raise OperationFailed("guest unexpectedly quit") from exc
    if status == "shutoff":
        raise OperationFailed("guest unexpectedly quit")
    if status == "inmigrate":
        raise OperationFailed("incoming migration did not complete before the deadline")


async def _resume_then_persist(ctx: DestinationContext, job: IncomingJob) -> None:
    """The guest runs again (unless PAUSED), then its definition is persisted (with
    PERSIST_DEST): the persist's flush is not part of the guest's pause.

    Safe because the FINISH3 record, on disk before this, holds the definition: a dstd
    that stops between the two finds FINISH3 and a running emulator, and completes the
    Finish, persisting it (dstd/recovery.py; libvirt: FINISH3 and running -> keep). A
    persist that fails after the resume fails Finish as the outcome's write after it
    always could: the emulator is killed before the answer, and the source, still
    paused, resumes (one runner at any instant). The events keep libvirt's order
    (Defined, then Resumed)."""
    resumed = False
    if MigrateFlag.PAUSED not in job.flags:
        try:
            await ctx.hypervisor.execute(job.target.uuid, "cont")
        except QMPError as exc:
            raise OperationFailed(f"resume operation failed: {exc}") from exc
        resumed = True
    if MigrateFlag.PERSIST_DEST in job.flags:
        await _persist(ctx, job)
    if resumed:
        ctx.obs.events.emit(job.target.name, job.target.uuid, events.RESUMED_MIGRATED)


async def finish_live(
    ctx: DestinationContext, job: IncomingJob, cancelled: bool, cookie: bytes
) -> pb.FinishResponse:
    """Live Finish: wait for the stream's end, persist with PERSIST_DEST, resume unless
    PAUSED, then answer with the domain.

    cancelled, or any failure: the incoming emulator is killed and the reservation dropped,
    and Finish returns no domain (or the error).
    """
    keep = False
    try:
        if cancelled:
            return cancelled_answer(ctx, job)
        # A dstd restarted from here on finds FINISH3: it completes a migration whose
        # stream arrived whole, and kills an incomplete one. The record is written while
        # the stream's end is awaited (the guest is paused meanwhile), and is on disk
        # before anything is persisted or resumed.
        journal = asyncio.ensure_future(asyncio.to_thread(ctx.store.journal_put, job.record))
        try:
            if cookie:
                received = parse_cookie(
                    cookie,
                    accept=ACCEPT_FINISH,
                    local_hostuuid=ctx.store.identity.host_uuid,
                    expect_uuid=job.target.uuid,
                )
                job.cookie_stats = received.statistics or ()
                job.cookie_received_unix = time.time()
            await _wait_incoming_done(ctx, job)
        except BaseException:
            with contextlib.suppress(Exception):  # no exit leaves the write in flight
                await journal
            raise
        await journal
        await storage.stop_nbd(ctx, job)  # nothing writes the disks once the guest runs
        emit = ctx.obs.events.emit
        emit(job.target.name, job.target.uuid, events.STARTED_MIGRATED)
        job.announced = True
        await _resume_then_persist(ctx, job)
        answer = await finished_answer(ctx, job, active=True)
        keep = True
        await ctx.failpoints.hit("dstd.finish.after_outcome")
        log.info(
            "incoming_finished",
            migration_id=job.migration_id,
            domain=job.target.name,
            paused=MigrateFlag.PAUSED in job.flags,
        )
        return answer
    except BaseException:
        await _undo_persist(ctx, job)
        raise
    finally:
        await ctx.incoming.drop(job, keep_running=keep)
        await ctx.failpoints.hit("dstd.finish.after")
