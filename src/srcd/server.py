"""srcd's gRPC server: the client API and the source phases.

Handlers raise VmmigrateError; :func:`handler` is the one place where srcd turns an error
into a gRPC status (with the error class in the trailing metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import structlog
from vmmigrate.common import events
from vmmigrate.common.address import check_migration_uri
from vmmigrate.common.authz import SRCD_POLICY
from vmmigrate.common.config import DaemonConfig
from vmmigrate.common.daemon import (
    abort_with,
    count_refusal,
    grpc_server,
    release_freed_memory,
    rpc_handler,
)
from vmmigrate.common.errors import InvalidArgument, OperationInvalid, VmmigrateError
from vmmigrate.common.failpoints import Failpoints
from vmmigrate.common.flags import MigrateFlag, check_api_flags, parse_flags
from vmmigrate.common.hostcheck import offers_warmed
from vmmigrate.common.hypervisor import hypervisor_for
from vmmigrate.common.observe import Observability, serving_metrics
from vmmigrate.common.phase import Phase, require
from vmmigrate.common.rpc import Deadline
from vmmigrate.common.store import HostStore
from vmmigrate.common.tls import daemon_tls
from vmmigrate.srcd import evacuate, phases, relay
from vmmigrate.srcd.context import OutgoingSlots, PeerPool, SourceContext
from vmmigrate.srcd.domains import DomainAPI, domain_ref, emulator_gone
from vmmigrate.srcd.jobs import SourceJob, SourceJobTable, SourceParams
from vmmigrate.srcd.mirror import nbd_server
from vmmigrate.srcd.p2p import P2PMigration, new_migration_id
from vmmigrate.srcd.perform import UNLIMITED_BPS, perform_live
from vmmigrate.srcd.recovery import expire_parked, recover_source_jobs
from vmmigrate.srcd.report import completed_job_info, job_ended, job_info, record_to_pb

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

log = structlog.get_logger("vmmigrate.srcd")

handler = rpc_handler("source")


def _require(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"missing {what}")
    return value


class DomainService(pb_grpc.DomainServiceServicer):
    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.api = DomainAPI(ctx)

    @handler
    async def Define(self, request: pb.DefineRequest, context: Any) -> pb.DefineResponse:
        d, updated = await self.api.define(request.xml)
        return pb.DefineResponse(domain=domain_ref(d), updated=updated)

    @handler
    async def Undefine(self, request: pb.UndefineRequest, context: Any) -> pb.UndefineResponse:
        d = await self.api.undefine(_require(request.domain, "domain name"))
        return pb.UndefineResponse(domain=domain_ref(d))

    @handler
    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return pb.ListResponse(domains=await self.api.list(request.all))

    @handler
    async def GetState(self, request: pb.DomainRequest, context: Any) -> pb.StateResponse:
        d, _ = await self.api.lookup(_require(request.domain, "domain name"))
        return pb.StateResponse(state=await self.api.state_of(d), reason="unknown")

    @handler
    async def GetInfo(self, request: pb.DomainRequest, context: Any) -> pb.InfoResponse:
        return await self.api.info(_require(request.domain, "domain name"))

    @handler
    async def DumpXML(self, request: pb.DumpXMLRequest, context: Any) -> pb.DumpXMLResponse:
        d, _ = await self.api.lookup(_require(request.domain, "domain name"))
        if not request.inactive:
            rec = self.ctx.hypervisor.record(d.uuid)
            if rec is not None and rec.xml:
                return pb.DumpXMLResponse(xml=rec.xml)  # the running definition
        return pb.DumpXMLResponse(xml=d.xml)

    @handler
    async def Migrate(self, request: pb.MigrateRequest, context: Any) -> pb.MigrateResponse:
        flags = parse_flags(request.flags, "migrate")
        check_api_flags(flags | MigrateFlag.PEER2PEER)
        migration = P2PMigration(
            self.ctx,
            migration_id=request.migration_id or new_migration_id(),
            domain_key=_require(request.domain, "domain name"),
            dest_uri=_require(request.dest_uri, "destination URI"),
            flags=flags,
            params=SourceParams.from_pb(request.params),
        )
        structlog.contextvars.bind_contextvars(migration_id=migration.migration_id)
        # The migration runs to its end (Finish, Confirm) even if the client goes away:
        # a half-run sequence would leave the destination reserved.
        result = await asyncio.shield(self.ctx.keep(migration.run()))
        return pb.MigrateResponse(
            migration_id=result.migration_id,
            dest_domain=result.dest_domain,
            phases=list(result.phases),
        )

    async def MigrateMany(
        self, requests: AsyncIterator[pb.MigrateManyRequest], context: Any
    ) -> AsyncIterator[pb.MigrateManyProgress]:
        """Host evacuation (srcd/evacuate.py): a stream, not unary, so not under @handler;
        a refused request is translated the same way (each domain's error travels in its
        result, with its code)."""
        with structlog.contextvars.bound_contextvars(rpc="MigrateMany", role="source"):
            try:
                async for msg in evacuate.migrate_many(self.ctx, requests):
                    yield msg
            except (OSError, VmmigrateError) as exc:
                count_refusal(self, exc)
                await abort_with(context, exc, log)

    @handler
    async def Start(self, request: pb.DomainRequest, context: Any) -> pb.DomainResponse:
        return await self.api.start(_require(request.domain, "domain name"))

    @handler
    async def Destroy(self, request: pb.DomainRequest, context: Any) -> pb.DomainResponse:
        return await self.api.destroy(_require(request.domain, "domain name"))

    @handler
    async def Shutdown(self, request: pb.DomainRequest, context: Any) -> pb.DomainResponse:
        return await self.api.shutdown(_require(request.domain, "domain name"))

    @handler
    async def Suspend(self, request: pb.DomainRequest, context: Any) -> pb.DomainResponse:
        return await self.api.suspend(_require(request.domain, "domain name"))

    @handler
    async def Resume(self, request: pb.DomainRequest, context: Any) -> pb.DomainResponse:
        return await self.api.resume(_require(request.domain, "domain name"))

    @handler
    async def GetJobInfo(self, request: pb.JobInfoRequest, context: Any) -> pb.JobInfo:
        d = await self.api.require_known(_require(request.domain, "domain name"))
        if request.completed:
            done = self.ctx.completed_jobs.get(d.uuid)
            return await completed_job_info(done, self.ctx.obs, d.uuid)
        job = self.ctx.jobs.for_domain(d.uuid)
        if job is None or job.offline:
            return pb.JobInfo(type="None")
        return job_info(
            job.all_stats(),
            job.migration_id,
            int((time.monotonic() - job.started) * 1000),
            "Unbounded",
            "",
        )

    @handler
    async def AbortJob(self, request: pb.AbortJobRequest, context: Any) -> pb.DomainResponse:
        d = await self.api.require_known(_require(request.domain, "domain name"))
        if not self.ctx.is_active(d):
            raise OperationInvalid("domain is not running")
        job = self.ctx.jobs.for_domain(d.uuid)
        if job is None or job.offline:
            raise OperationInvalid("no job is active on the domain")
        job.abort_requested = True
        log.info("abort_requested", migration_id=job.migration_id, domain=d.name)
        return pb.DomainResponse(domain=domain_ref(d, True), state=await self.api.state_of(d))

    @handler
    async def SetMaxSpeed(self, request: pb.SpeedRequest, context: Any) -> pb.SpeedResponse:
        d = await self.api.require_known(_require(request.domain, "domain name"))
        if request.bandwidth_mib > MAX_SPEED_MIB:
            raise InvalidArgument(f"bandwidth must be less than {MAX_SPEED_MIB + 1}")
        self.ctx.max_speed_mib[d.uuid] = request.bandwidth_mib
        job = self.ctx.jobs.for_domain(d.uuid)
        if job is not None and not job.offline and self.ctx.is_active(d):
            # a running migration takes the new cap at once
            bps = request.bandwidth_mib * 1024 * 1024 or UNLIMITED_BPS
            await self.ctx.hypervisor.execute(
                d.uuid, "migrate-set-parameters", {"max-bandwidth": bps}
            )
        return pb.SpeedResponse(bandwidth_mib=request.bandwidth_mib)

    @handler
    async def GetMaxSpeed(self, request: pb.DomainRequest, context: Any) -> pb.SpeedResponse:
        d = await self.api.require_known(_require(request.domain, "domain name"))
        return pb.SpeedResponse(bandwidth_mib=self.ctx.max_speed_mib.get(d.uuid, MAX_SPEED_MIB))

    @handler
    async def SetMaxDowntime(self, request: pb.DowntimeRequest, context: Any) -> pb.DomainResponse:
        d = await self.api.require_known(_require(request.domain, "domain name"))
        if request.downtime_ms == 0:
            raise InvalidArgument("migrate-setmaxdowntime: Invalid downtime")
        self.ctx.max_downtime_ms[d.uuid] = request.downtime_ms
        if self.ctx.jobs.for_domain(d.uuid) is not None and self.ctx.is_active(d):
            await self.ctx.hypervisor.execute(
                d.uuid, "migrate-set-parameters", {"downtime-limit": request.downtime_ms}
            )
        return pb.DomainResponse(domain=domain_ref(d), state=await self.api.state_of(d))

    async def Events(
        self, request: pb.EventsRequest, context: Any
    ) -> AsyncIterator[pb.DomainEvent]:
        """The host's lifecycle events from now on, until the client goes away (a stream:
        not unary, so not under @handler; errors are translated the same way)."""
        # logged once the stream follows the log: what comes after reaches this client
        log.info("events_stream_opened", domain=request.domain or None)
        try:
            async for ev in events.follow(self.ctx.obs.events):
                if request.domain and request.domain not in (ev.domain, ev.uuid):
                    continue
                yield pb.DomainEvent(
                    domain=ev.domain,
                    uuid=ev.uuid,
                    event=ev.event,
                    detail=ev.detail,
                    time_unix=ev.time_unix,
                    daemon=ev.daemon,
                )
        except (OSError, VmmigrateError) as exc:
            count_refusal(self, exc)
            await abort_with(context, exc, log)

    @handler
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        found = await asyncio.to_thread(self.ctx.obs.history.list, request.domain, request.limit)
        return pb.ListJobsResponse(jobs=[record_to_pb(rec) for rec in found])


# libvirt's unlimited migration speed (QEMU_DOMAIN_MIG_BANDWIDTH_MAX, MiB/s)
MAX_SPEED_MIB = 8796093022207


class MigrationSourceService(pb_grpc.MigrationSourceServiceServicer):
    """Begin, Perform and Confirm for a migration the client drives itself."""

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    @handler
    async def DestinationCapabilities(
        self, request: pb.RelayCapabilitiesRequest, context: Any
    ) -> pb.CapabilitiesResponse:
        return await relay.capabilities(self.ctx, request, context)

    @handler
    async def DestinationPrepare(
        self, request: pb.RelayPrepareRequest, context: Any
    ) -> pb.PrepareResponse:
        return await relay.prepare(self.ctx, request, context)

    @handler
    async def DestinationFinish(
        self, request: pb.RelayFinishRequest, context: Any
    ) -> pb.FinishResponse:
        return await relay.finish(self.ctx, request, context)

    @handler
    async def Begin(self, request: pb.BeginRequest, context: Any) -> pb.BeginResponse:
        h = request.header
        flags = parse_flags(h.flags, "begin")
        if MigrateFlag.PEER2PEER in flags:
            raise InvalidArgument("use DomainService.Migrate for peer-to-peer migration")
        if h.cookie:
            raise InvalidArgument("received unexpected cookie in the Begin phase")
        job, begun = await phases.begin(
            self.ctx,
            migration_id=_require(h.migration_id, "migration id"),
            domain_key=_require(request.domain, "domain name"),
            flags=flags,
            params=SourceParams.from_pb(request.params),
            peer=request.dest_address,
            deadline=Deadline.from_unix_ms(
                h.deadline_unix_ms,
                self.ctx.config.migration_timeout,
                cap=self.ctx.config.migration_timeout,
            ),
            driven=False,
            queue_wait=min(self.ctx.config.rpc_timeout / 2, 10.0),
        )
        return pb.BeginResponse(
            cookie=begun.cookie,
            domain_xml=begun.domain_xml,
            flags=int(begun.flags),
            domain_name=job.domain.name,
        )

    @handler
    async def Perform(self, request: pb.PerformRequest, context: Any) -> pb.PerformResponse:
        h = request.header
        flags = parse_flags(h.flags, "perform")
        if MigrateFlag.PEER2PEER in flags or request.dest_uri:
            raise InvalidArgument("use DomainService.Migrate for peer-to-peer migration")
        job = self.ctx.jobs.get(_require(h.migration_id, "migration id"), request.domain)
        job.touch()
        if job.offline:
            raise InvalidArgument("offline migration has no Perform phase")
        uri = request.params.migrate_uri
        if not uri:
            raise InvalidArgument("domainMigratePrepare3 did not set uri")
        # the client's URI goes to the emulator's migrate: only what a Prepare answers
        check_migration_uri(uri)
        return pb.PerformResponse(cookie=await self._perform(job, uri, h.cookie))

    @require(Phase.BEGIN3)
    async def _perform(self, job: SourceJob, uri: str, cookie: bytes) -> bytes:
        job.driven = True  # the job is busy: no expiry while the stream runs
        try:
            # storage copy: the destination's NBD server, from Prepare's cookie
            nbd = nbd_server(self.ctx, job, cookie, uri) if job.copies else None
            return await asyncio.shield(
                self.ctx.keep(perform_live(self.ctx, job, uri=uri, nbd=nbd))
            )
        except VmmigrateError:
            # managed mode: a failed Perform restores the source and ends the job itself;
            # the client calls Finish(cancelled) and no Confirm (libvirt's, docs/ARCHITECTURE.md).
            await phases.confirm(self.ctx, job, cancelled=True, cookie=b"")
            raise
        finally:
            job.driven = False
            job.touch()

    @handler
    async def Confirm(self, request: pb.ConfirmRequest, context: Any) -> pb.ConfirmResponse:
        h = request.header
        parse_flags(h.flags, "confirm")
        mid = _require(h.migration_id, "migration id")
        if self.ctx.ended.get(mid) == request.cancelled:
            return pb.ConfirmResponse()  # a retry: the job ended the way it asks
        job = self.ctx.jobs.get(mid, request.domain)
        if job.driven:
            raise InvalidArgument(
                f"migration '{job.migration_id}' is driven by the source host itself"
            )
        await self._confirm(job, request.cancelled, h.cookie)
        return pb.ConfirmResponse()

    # A parked job is confirmed after Begin (Prepare failed, or offline) or after its
    # stream completed; while the stream runs, the job is driven (refused above).
    @require(Phase.BEGIN3, Phase.PERFORM3_DONE)
    async def _confirm(self, job: SourceJob, cancelled: bool, cookie: bytes) -> None:
        await phases.confirm(self.ctx, job, cancelled=cancelled, cookie=cookie)


LOCK_SWEEP_INTERVAL = 600.0  # seconds between sweeps of unused job lock files


async def _housekeeping(ctx: SourceContext) -> None:
    """End parked jobs whose client went away; reap emulators this process started, and
    settle those gone while their owner was not running (dstd only reaps its own); now
    and then, remove the job lock files of domains that left this host."""
    ctx.hypervisor.sweep()
    await expire_parked(ctx)
    now = time.monotonic()
    if now - ctx.locks_swept >= LOCK_SWEEP_INTERVAL:  # a directory scan: not every tick
        ctx.locks_swept = now
        running = frozenset(rec.uuid for rec in ctx.hypervisor.records())
        await asyncio.to_thread(ctx.store.sweep_job_locks, running)


@contextlib.asynccontextmanager
async def running_server(config: DaemonConfig) -> AsyncIterator[tuple[str, SourceContext]]:
    """Start srcd's server; yields (bound address, context)."""
    # first: a daemon that may not listen in plaintext refuses before touching its state
    tls = daemon_tls(config.listen, config.tls_dir, config.insecure)
    store = HostStore.for_daemon(config)
    failpoints = Failpoints.parse(config.failpoints, config.failpoint_seed or None)
    ctx = SourceContext(
        config=config,
        store=store,
        jobs=SourceJobTable(),
        peers=PeerPool(config.max_message_bytes, tls, failpoints),
        failpoints=failpoints,
        hypervisor=hypervisor_for(config, "srcd"),
        outgoing=OutgoingSlots(config.max_outgoing),
        obs=Observability.for_daemon(config, "srcd", "source"),
    )
    ctx.jobs.on_end = lambda job: job_ended(ctx.obs, job)
    ctx.hypervisor.on_gone = lambda rec, how: emulator_gone(ctx, rec, how)
    ctx.obs.metrics.track_in_flight(lambda: len(ctx.jobs))
    # before serving: the journal's jobs are held again, then settled in the background
    recover_source_jobs(ctx)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_DomainServiceServicer_to_server(DomainService(ctx), server)
        pb_grpc.add_MigrationSourceServiceServicer_to_server(MigrationSourceService(ctx), server)

    try:
        async with (
            grpc_server(
                config,
                register,
                ("vmmigrate.v1.DomainService", "vmmigrate.v1.MigrationSourceService"),
                lambda: _housekeeping(ctx),
                gate=ctx.gate,
                tls=tls,
                on_refused=ctx.obs.metrics.refused,
                policy=SRCD_POLICY,
            ) as address,
            offers_warmed(ctx.hypervisor.settings, release_freed_memory),
        ):
            with serving_metrics(ctx.obs, config.metrics_listen):
                yield address, ctx
    finally:
        await ctx.peers.close()
        await ctx.hypervisor.close()
