"""dstd's gRPC server: capabilities, Prepare, Finish.

Handlers raise VmmigrateError; :func:`handler` is the one place where dstd turns an error
into a gRPC status (with the error class in the trailing metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import structlog

from common.caps import PROTOCOL_VERSION
from common.config import DaemonConfig
from common.daemon import abort_with, grpc_server, rpc_handler
from common.errors import InvalidArgument, NoDomain, OperationInvalid, VmmigrateError
from common.failpoints import Failpoints
from common.flags import parse_flags
from common.hypervisor import hypervisor_for
from common.rpc import Deadline
from common.store import HostStore
from dstd import phases
from dstd.context import DestinationContext
from dstd.incoming import IncomingTable
from dstd.ports import PortAllocator
from dstd.tunnel import carry_tunnel
from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

log = structlog.get_logger("vmmigrate.dstd")

FEATURES = (
    "MIGRATION_V3",
    "MIGRATION_P2P",
    "MIGRATE_CHANGE_PROTECTION",
    "MIGRATION_OFFLINE",
    "MIGRATION_PARAMS",
)

handler = rpc_handler("destination")


class MigrationDestinationService(pb_grpc.MigrationDestinationServiceServicer):
    def __init__(self, ctx: DestinationContext) -> None:
        self.ctx = ctx

    @handler
    async def GetCapabilities(
        self, request: pb.CapabilitiesRequest, context: Any
    ) -> pb.CapabilitiesResponse:
        identity = self.ctx.store.identity
        return pb.CapabilitiesResponse(
            protocol_version=PROTOCOL_VERSION,
            host_uuid=identity.host_uuid,
            hostname=identity.hostname,
            offline=True,
            live=True,
            tunnelled=True,
            params=True,
            features=list(FEATURES),
        )

    async def _prepare(
        self, request: pb.PrepareRequest, context: Any, tunnel_rpc: bool
    ) -> pb.PrepareResponse:
        h = request.header
        if not h.migration_id:
            raise InvalidArgument("missing migration id")
        cfg = self.ctx.config
        return await phases.prepare(
            self.ctx,
            phases.PrepareInput(
                migration_id=h.migration_id,
                flags=parse_flags(h.flags, "prepare"),
                cookie=h.cookie,
                domain_xml=request.domain_xml,
                dest_name=request.params.dest_name,
                persist_xml=request.params.persist_xml,
                deadline=Deadline.from_unix_ms(
                    h.deadline_unix_ms, cfg.migration_timeout, cap=cfg.migration_timeout
                ),
                peer=context.peer(),
            ),
            tunnel_rpc=tunnel_rpc,
        )

    @handler
    async def Prepare(self, request: pb.PrepareRequest, context: Any) -> pb.PrepareResponse:
        return await self._prepare(request, context, tunnel_rpc=False)

    @handler
    async def PrepareTunnel(self, request: pb.PrepareRequest, context: Any) -> pb.PrepareResponse:
        return await self._prepare(request, context, tunnel_rpc=True)

    @handler
    async def Finish(self, request: pb.FinishRequest, context: Any) -> pb.FinishResponse:
        h = request.header
        parse_flags(h.flags, "finish")
        if not h.migration_id:
            raise InvalidArgument("missing migration id")
        # Finish must run to its end once started (a client that goes away half-way must
        # not leave a reservation, an emulator or a half-done persist behind), and a retry
        # of it (same migration id) gets the first answer: the work is done once.
        if not request.dest_name:
            raise NoDomain("missing domain name")
        if h.migration_id not in self.ctx.incoming and h.migration_id not in self.ctx.results:
            if request.cancelled:
                # A source that could not learn whether its Prepare arrived cancels it
                # blindly: remember the id, so that a Prepare delivered late (a TCP
                # retransmission after a partition) is refused instead of reserving.
                self.ctx.results.tombstone(h.migration_id)
                return pb.FinishResponse()
            raise OperationInvalid(
                f"domain '{request.dest_name}' is not processing incoming migration"
            )
        job = self.ctx.incoming.find(h.migration_id)
        if job is not None and job.target.name != request.dest_name:
            # Refused before it touches the job: not an answer to keep for retries, or the
            # right Finish (or the source's cancel) would get this error and never run.
            raise NoDomain(f"no domain with matching name '{request.dest_name}'")
        return await self.ctx.results.run_once(
            h.migration_id,
            lambda: phases.finish(
                self.ctx, h.migration_id, request.dest_name, request.cancelled, h.cookie
            ),
        )

    async def Tunnel(
        self, request_iterator: AsyncIterator[pb.TunnelChunk], context: Any
    ) -> AsyncIterator[pb.TunnelChunk]:
        """The migration stream of a tunnelled migration (errors end the stream with a
        status, like every other RPC; a streaming handler cannot use @handler)."""
        with structlog.contextvars.bound_contextvars(rpc="Tunnel", role="destination"):
            try:
                async for chunk in carry_tunnel(self.ctx, request_iterator):
                    yield chunk
            except VmmigrateError as exc:
                await abort_with(context, exc, log)


def recover_incoming_jobs(store: HostStore) -> int:
    """Drop incoming migrations left by a previous dstd.

    PREPARE: nothing was defined; the reservation goes (libvirt kills an unfinished incoming
    migration). FINISH3 (offline): the definition was persisted atomically or not at all,
    and the source, whose Finish call failed, kept its own: the domain is not lost either way.
    """
    count = 0
    for rec in store.journal_list(role="destination"):
        log.warning(
            "stale_incoming_job_dropped",
            migration_id=rec.migration_id,
            domain=rec.domain_name,
            phase=rec.phase,
        )
        store.release_incoming(rec.migration_id)
        count += 1
    return count


async def _housekeeping(ctx: DestinationContext) -> None:
    """Drop incoming jobs whose Finish never came; reap emulators this process started."""
    ctx.hypervisor.reap()
    ctx.results.expire()
    await ctx.incoming.expire(ctx.config.job_idle_timeout)


@contextlib.asynccontextmanager
async def running_server(config: DaemonConfig) -> AsyncIterator[tuple[str, DestinationContext]]:
    """Start dstd's server; yields (bound address, context)."""
    store = HostStore(
        config.state_dir,
        host_uuid=config.host_uuid,
        hostname=config.hostname,
        max_xml_bytes=config.max_xml_bytes,
    )
    await asyncio.to_thread(recover_incoming_jobs, store)
    hypervisor = hypervisor_for(
        config.state_dir, config.emulator, config.qemu_binary, config.qemu_accel, "dstd"
    )
    ports = PortAllocator(*config.migration_ports)
    ctx = DestinationContext(
        config=config,
        store=store,
        incoming=IncomingTable(store, hypervisor, ports),
        failpoints=Failpoints.parse(config.failpoints),
        hypervisor=hypervisor,
        ports=ports,
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_MigrationDestinationServiceServicer_to_server(
            MigrationDestinationService(ctx), server
        )

    try:
        async with grpc_server(
            config,
            register,
            ("vmmigrate.v1.MigrationDestinationService",),
            lambda: _housekeeping(ctx),
        ) as address:
            yield address, ctx
    finally:
        await ctx.hypervisor.close()
