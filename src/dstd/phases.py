"""The destination phases: Prepare and Finish (libvirt's qemuMigrationDst*).

One function per phase variant: prepare_offline, finish_offline; the dispatch is at the top
(prepare, finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import structlog

from common.cookie import ACCEPT_PREPARE, MigrationCookie, format_cookie, parse_cookie
from common.domainxml import DomainDef, check_abi_stable, parse_domain, rename
from common.errors import ArgumentUnsupported, InvalidArgument, NoDomain, OperationInvalid
from common.flags import MigrateFlag, check_prepare_flags
from common.phase import Phase
from common.rpc import Deadline
from common.store import JobRecord, validate_migration_id
from dstd.context import DestinationContext
from dstd.incoming import IncomingJob
from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.dstd.phases")


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


def _reply_cookie(ctx: DestinationContext, origname: str, uuid: str) -> bytes:
    identity = ctx.store.identity
    return format_cookie(
        MigrationCookie(
            name=origname, uuid=uuid, hostname=identity.hostname, hostuuid=identity.host_uuid
        )
    )


def _target_definition(ctx: DestinationContext, req: PrepareInput) -> tuple[DomainDef, DomainDef]:
    """(the definition received, the one to persist: PERSIST_XML if given, renamed)."""
    if not req.domain_xml:
        raise InvalidArgument("no domain XML passed")
    received = parse_domain(req.domain_xml, max_bytes=ctx.config.max_xml_bytes, generate_uuid=False)
    target = received
    if req.persist_xml:
        # libvirt ignores persistent_xml for offline migration (Finish gets no cookie); we
        # honour it, because an operator who passes it expects it to be what is defined.
        target = parse_domain(
            req.persist_xml, max_bytes=ctx.config.max_xml_bytes, generate_uuid=False
        )
        new_name = req.dest_name if target.name == req.dest_name else None
        check_abi_stable(received, target, new_name=new_name)
    if req.dest_name:
        target = rename(target, req.dest_name)
    return received, target


async def prepare(ctx: DestinationContext, req: PrepareInput) -> pb.PrepareResponse:
    """Prepare: validate, reserve the name and UUID, answer with a cookie (and a URI).

    On failure nothing is reserved. On success the incoming job holds the reservation
    until Finish, or until its deadline passes without one.
    """
    validate_migration_id(req.migration_id)
    # libvirt's PrepareAny order: the offline trio first, then post-copy, then the rest.
    check_prepare_flags(req.flags)
    if MigrateFlag.TUNNELLED in req.flags:
        raise OperationInvalid("Tunnelled migration requested but invalid RPC method called")
    if MigrateFlag.OFFLINE in req.flags:
        return await prepare_offline(ctx, req)
    raise ArgumentUnsupported("live migration is not supported by this destination host")


async def prepare_offline(ctx: DestinationContext, req: PrepareInput) -> pb.PrepareResponse:
    if req.migration_id in ctx.incoming:
        raise OperationInvalid(f"migration id '{req.migration_id}' is already in use")
    received, target = _target_definition(ctx, req)
    parse_cookie(
        req.cookie,
        accept=ACCEPT_PREPARE,
        local_hostuuid=ctx.store.identity.host_uuid,
        expect_name=received.name,
        expect_uuid=received.uuid,
    )
    now = time.time()
    record = JobRecord(
        migration_id=req.migration_id,
        role="destination",
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
    await ctx.failpoints.hit("dstd.prepare.before_reserve")
    async with contextlib.AsyncExitStack() as undo:
        replaces = await asyncio.to_thread(ctx.store.reserve_incoming, record)
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
        undo.push_async_callback(ctx.incoming.drop, job)
        await ctx.failpoints.hit("dstd.prepare.after_reserve")
        undo.pop_all()
    log.info(
        "incoming_prepared",
        migration_id=req.migration_id,
        domain=target.name,
        replaces=replaces,
    )
    # Offline starts nothing and needs no port: the URI stays empty.
    return pb.PrepareResponse(cookie=_reply_cookie(ctx, received.name, received.uuid), uri="")


async def finish(
    ctx: DestinationContext, migration_id: str, dest_name: str, cancelled: bool
) -> pb.FinishResponse:
    """Finish: dispatch to its variant. The incoming job always ends here."""
    if not dest_name:
        raise NoDomain("missing domain name")
    job = ctx.incoming.get(migration_id, dest_name)
    if job.target.name != dest_name:
        raise NoDomain(f"no domain with matching name '{dest_name}'")
    if job.busy:
        raise OperationInvalid(f"Finish of migration '{migration_id}' is already running")
    job.busy = True
    try:
        await ctx.failpoints.hit("dstd.finish.before")
        job.advance(Phase.FINISH3)
        job.record = job.record.with_phase(job.phase.label)
        if job.offline:
            return await finish_offline(ctx, job, cancelled)
        raise ArgumentUnsupported("live migration is not supported by this destination host")
    finally:
        job.busy = False


async def finish_offline(
    ctx: DestinationContext, job: IncomingJob, cancelled: bool
) -> pb.FinishResponse:
    """Offline Finish: persist the definition durably, and only then answer with a domain.

    cancelled: drop the reservation, return no domain. Any failure: drop the reservation and
    report the error; the store never holds a half-written config (atomic write).
    """
    try:
        if cancelled:
            log.info("incoming_cancelled", migration_id=job.migration_id)
            return pb.FinishResponse()
        await asyncio.to_thread(ctx.store.journal_put, job.record)
        await ctx.failpoints.hit("dstd.finish.before_persist")
        replaced = await asyncio.to_thread(ctx.store.persist_incoming, job.migration_id, job.target)
        await ctx.failpoints.hit("dstd.finish.after_persist")
        log.info(
            "incoming_persisted",
            migration_id=job.migration_id,
            domain=job.target.name,
            libvirt_event="DEFINED",
            detail="UPDATED" if replaced else "ADDED",
        )
        return pb.FinishResponse(
            domain=pb.DomainRef(name=job.target.name, uuid=job.target.uuid, id=-1),
            cookie=_reply_cookie(ctx, job.origname, job.target.uuid),
        )
    finally:
        await ctx.incoming.drop(job)
        await ctx.failpoints.hit("dstd.finish.after")
