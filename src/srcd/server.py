"""srcd's gRPC server: the client API and the source phases.

Handlers raise VmmigrateError; :func:`handler` is the one place where srcd turns an error
into a gRPC status (with the error class in the trailing metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from common.config import DaemonConfig
from common.errors import InvalidArgument, VmmigrateError
from common.failpoints import Failpoints
from common.flags import MigrateFlag, check_api_flags, parse_flags
from common.rpc import SERVER_OPTIONS_BASE, Deadline, message_size_options, status_of
from common.store import HostStore
from srcd import phases
from srcd.context import PeerPool, SourceContext
from srcd.domains import DomainAPI, domain_ref
from srcd.jobs import SourceJobTable, SourceParams
from srcd.p2p import P2PMigration, new_migration_id
from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

log = structlog.get_logger("vmmigrate.srcd")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def handler(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Bind log context for the RPC and translate errors to a gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        header = getattr(request, "header", None)
        mid = getattr(header, "migration_id", "") or getattr(request, "migration_id", "")
        with structlog.contextvars.bound_contextvars(
            rpc=fn.__name__, role="source", migration_id=mid or None
        ):
            try:
                return await fn(self, request, context)
            except Exception as exc:
                code, message, metadata = status_of(exc)
                if isinstance(exc, VmmigrateError):
                    log.info("rpc_failed", code=code.name, error=message)
                else:
                    log.exception("rpc_crashed")
                await context.abort(code, message, trailing_metadata=tuple(metadata))

    return wrapper


def params_from_pb(p: pb.MigrationParams) -> SourceParams:
    return SourceParams(
        dest_name=p.dest_name,
        dest_xml=p.dest_xml,
        persist_xml=p.persist_xml,
        migrate_uri=p.migrate_uri,
        bandwidth_mib=p.bandwidth_mib,
    )


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
        d = await self.api.lookup(_require(request.domain, "domain name"))
        return pb.StateResponse(state=self.api.state_of(d), reason="unknown")

    @handler
    async def GetInfo(self, request: pb.DomainRequest, context: Any) -> pb.InfoResponse:
        return await self.api.info(_require(request.domain, "domain name"))

    @handler
    async def DumpXML(self, request: pb.DumpXMLRequest, context: Any) -> pb.DumpXMLResponse:
        d = await self.api.lookup(_require(request.domain, "domain name"))
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
            params=params_from_pb(request.params),
        )
        structlog.contextvars.bind_contextvars(migration_id=migration.migration_id)
        # The migration runs to its end (Finish, Confirm) even if the client goes away:
        # a half-run sequence would leave the destination reserved.
        result = await asyncio.shield(asyncio.ensure_future(migration.run()))
        return pb.MigrateResponse(
            migration_id=result.migration_id,
            dest_domain=result.dest_domain,
            phases=list(result.phases),
        )


class MigrationSourceService(pb_grpc.MigrationSourceServiceServicer):
    """Begin, Perform and Confirm for a migration the client drives itself."""

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    @handler
    async def Begin(self, request: pb.BeginRequest, context: Any) -> pb.BeginResponse:
        h = request.header
        flags = parse_flags(h.flags, "begin")
        if MigrateFlag.PEER2PEER in flags:
            raise InvalidArgument("use DomainService.Migrate for peer-to-peer migration")
        if h.cookie:
            raise InvalidArgument("received unexpected cookie in the Begin phase")
        _job, begun = await phases.begin(
            self.ctx,
            migration_id=_require(h.migration_id, "migration id"),
            domain_key=_require(request.domain, "domain name"),
            flags=flags,
            params=params_from_pb(request.params),
            peer="",
            deadline=Deadline.from_unix_ms(
                h.deadline_unix_ms,
                self.ctx.config.migration_timeout,
                cap=self.ctx.config.migration_timeout,
            ),
            driven=False,
        )
        return pb.BeginResponse(
            cookie=begun.cookie, domain_xml=begun.domain_xml, flags=int(begun.flags)
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
        raise InvalidArgument("live migration is not supported by this source host")

    @handler
    async def Confirm(self, request: pb.ConfirmRequest, context: Any) -> pb.ConfirmResponse:
        h = request.header
        parse_flags(h.flags, "confirm")
        job = self.ctx.jobs.get(_require(h.migration_id, "migration id"), request.domain)
        if job.driven:
            raise InvalidArgument(
                f"migration '{job.migration_id}' is driven by the source host itself"
            )
        await phases.confirm(self.ctx, job, cancelled=request.cancelled, cookie=h.cookie)
        return pb.ConfirmResponse()


def recover_source_jobs(store: HostStore) -> int:
    """Forget source jobs left by a previous srcd (the lock died with its process).

    An offline migration never changed the source before Confirm, and Confirm undefines the
    source (with --undefinesource) before the record goes, so dropping the record leaves the
    domain defined here: never lost (libvirt's BEGIN3 rule: forget the job)."""
    count = 0
    for rec in store.journal_list(role="source"):
        log.warning(
            "stale_source_job_dropped",
            migration_id=rec.migration_id,
            domain=rec.domain_name,
            phase=rec.phase,
        )
        store.journal_remove(rec.migration_id)
        count += 1
    return count


@contextlib.asynccontextmanager
async def running_server(config: DaemonConfig) -> Any:
    """Start srcd's server; yields (server, bound address, context)."""
    store = HostStore(
        config.state_dir,
        host_uuid=config.host_uuid,
        hostname=config.hostname,
        max_xml_bytes=config.max_xml_bytes,
    )
    await asyncio.to_thread(recover_source_jobs, store)
    ctx = SourceContext(
        config=config,
        store=store,
        jobs=SourceJobTable(store),
        peers=PeerPool(config.max_message_bytes),
        failpoints=Failpoints.parse(config.failpoints),
    )
    server = grpc.aio.server(
        options=SERVER_OPTIONS_BASE + message_size_options(config.max_message_bytes)
    )
    pb_grpc.add_DomainServiceServicer_to_server(DomainService(ctx), server)
    pb_grpc.add_MigrationSourceServiceServicer_to_server(MigrationSourceService(ctx), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(config.listen)
    await server.start()
    for name in ("", "vmmigrate.v1.DomainService", "vmmigrate.v1.MigrationSourceService"):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    expiry = asyncio.ensure_future(ctx.jobs.run_expiry(config.job_idle_timeout))
    host = config.listen.rpartition(":")[0]
    try:
        yield server, f"{host}:{port}", ctx
    finally:
        expiry.cancel()
        await health.enter_graceful_shutdown()
        await server.stop(grace=2.0)
        await ctx.peers.close()
