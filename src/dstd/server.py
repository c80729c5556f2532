"""dstd's gRPC server: capabilities, Prepare, Finish.

Handlers raise VmmigrateError; :func:`handler` is the one place where dstd turns an error
into a gRPC status (with the error class in the trailing metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import structlog
from vmmigrate.common import tunnelwire
from vmmigrate.common.authz import DSTD_POLICY
from vmmigrate.common.caps import PROTOCOL_VERSION
from vmmigrate.common.config import DaemonConfig
from vmmigrate.common.daemon import abort_with, grpc_server, release_freed_memory, rpc_handler
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.failpoints import Failpoints
from vmmigrate.common.flags import parse_flags
from vmmigrate.common.hostcheck import offers_warmed
from vmmigrate.common.hypervisor import hypervisor_for
from vmmigrate.common.observe import Observability, serving_metrics
from vmmigrate.common.rpc import Deadline
from vmmigrate.common.store import HostStore
from vmmigrate.common.tls import daemon_tls
from vmmigrate.dstd import batch, phases
from vmmigrate.dstd.context import DestinationContext
from vmmigrate.dstd.incoming import IncomingTable
from vmmigrate.dstd.ports import PortAllocator
from vmmigrate.dstd.recovery import recover_incoming_jobs
from vmmigrate.dstd.report import emulator_gone, job_dropped
from vmmigrate.dstd.results import FinishResults
from vmmigrate.dstd.tunnel import carry_tunnel_bytes

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
        cfg = self.ctx.config
        req = phases.PrepareInput(
            migration_id=phases.require_migration_id(h.migration_id),
            flags=parse_flags(h.flags, "prepare"),
            cookie=h.cookie,
            domain_xml=request.domain_xml,
            dest_name=request.params.dest_name,
            persist_xml=request.params.persist_xml,
            deadline=Deadline.from_unix_ms(
                h.deadline_unix_ms, cfg.migration_timeout, cap=cfg.migration_timeout
            ),
            peer=context.peer(),
        )
        return await phases.prepare_once(
            self.ctx, req, tunnel_rpc=tunnel_rpc, fingerprint=_fingerprint(request, tunnel_rpc)
        )

    @handler
    async def Prepare(self, request: pb.PrepareRequest, context: Any) -> pb.PrepareResponse:
        return await self._prepare(request, context, tunnel_rpc=False)

    @handler
    async def PrepareTunnel(self, request: pb.PrepareRequest, context: Any) -> pb.PrepareResponse:
        return await self._prepare(request, context, tunnel_rpc=True)

    @handler
    async def Finish(self, request: pb.FinishRequest, context: Any) -> pb.FinishResponse:
        return await self._finish(request)

    async def _finish(self, request: pb.FinishRequest) -> pb.FinishResponse:
        h = request.header
        parse_flags(h.flags, "finish")
        return await phases.finish_once(
            self.ctx, h.migration_id, request.dest_name, request.cancelled, h.cookie
        )

    @handler
    async def PrepareBatch(
        self, request: pb.PrepareBatchRequest, context: Any
    ) -> pb.PrepareBatchResponse:
        """Prepare of each item, concurrently, each answered on its own (batch.py)."""
        results = await batch.run_items(
            self,
            "Prepare",
            request.items,
            lambda item: self._prepare(item, context, tunnel_rpc=False),
        )
        return pb.PrepareBatchResponse(
            items=[
                pb.PrepareBatchItem(error=r)
                if isinstance(r, pb.ItemStatus)
                else pb.PrepareBatchItem(response=r)
                for r in results
            ]
        )

    @handler
    async def FinishBatch(
        self, request: pb.FinishBatchRequest, context: Any
    ) -> pb.FinishBatchResponse:
        """Finish of each item, concurrently (their definitions and outcomes in shared
        flushes: the group commits of context.py), each answered on its own."""
        results = await batch.run_items(self, "Finish", request.items, self._finish)
        return pb.FinishBatchResponse(
            items=[
                pb.FinishBatchItem(error=r)
                if isinstance(r, pb.ItemStatus)
                else pb.FinishBatchItem(response=r)
                for r in results
            ]
        )

    async def TunnelBytes(
        self, request_iterator: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[bytes]:
        """TunnelBytes.Carry (common/tunnelwire.py): the stream as raw bytes, the migration
        id in the call's metadata (errors end the stream with a status, like every other
        RPC; a streaming handler cannot use @handler)."""
        with structlog.contextvars.bound_contextvars(rpc="TunnelBytes", role="destination"):
            metadata = dict(context.invocation_metadata() or ())
            migration_id = str(metadata.get(tunnelwire.MIGRATION_ID_KEY, ""))
            channel = str(metadata.get(tunnelwire.CHANNEL_KEY, ""))
            try:
                async for data in carry_tunnel_bytes(
                    self.ctx, migration_id, request_iterator, channel
                ):
                    yield data
            except VmmigrateError as exc:
                await abort_with(context, exc, log)


def _fingerprint(request: pb.PrepareRequest, tunnel_rpc: bool) -> str:
    """What makes a Prepare a retry of another: the same request, byte for byte (the
    deadline aside: a retry may carry a later one)."""
    same = pb.PrepareRequest()
    same.CopyFrom(request)
    same.header.deadline_unix_ms = 0
    digest = hashlib.sha256(same.SerializeToString(deterministic=True))
    digest.update(b"tunnel" if tunnel_rpc else b"")
    return digest.hexdigest()


OUTCOME_SWEEP_INTERVAL = 300.0  # seconds between sweeps of expired outcomes


async def _housekeeping(ctx: DestinationContext) -> None:
    """Drop incoming jobs whose Finish never came; reap emulators this process started."""
    ctx.hypervisor.reap()
    ctx.results.expire()
    ctx.prepares.expire()
    now = time.monotonic()
    if now - ctx.outcomes_swept >= OUTCOME_SWEEP_INTERVAL:  # a directory scan: not every tick
        ctx.outcomes_swept = now
        await asyncio.to_thread(ctx.store.outcomes_expire, ctx.config.outcome_ttl)
    await ctx.incoming.expire(ctx.config.job_idle_timeout)


@contextlib.asynccontextmanager
async def running_server(config: DaemonConfig) -> AsyncIterator[tuple[str, DestinationContext]]:
    """Start dstd's server; yields (bound address, context)."""
    # first: a daemon that may not listen in plaintext refuses before touching its state
    tls = daemon_tls(config.listen, config.tls_dir, config.insecure)
    store = HostStore.for_daemon(config)
    hypervisor = hypervisor_for(config, "dstd")
    obs = Observability.for_daemon(config, "dstd", "destination")
    # before serving: every Finish is answered from a settled state
    await recover_incoming_jobs(store, hypervisor, obs.metrics.recovered)
    ports = PortAllocator(*config.migration_ports)
    ctx = DestinationContext(
        config=config,
        store=store,
        incoming=IncomingTable(store, hypervisor, ports),
        failpoints=Failpoints.parse(config.failpoints, config.failpoint_seed or None),
        hypervisor=hypervisor,
        ports=ports,
        results=FinishResults(store),
        obs=obs,
    )
    ctx.incoming.on_drop = lambda job: job_dropped(obs, job)
    hypervisor.on_gone = lambda rec, how: emulator_gone(ctx, rec, how)
    obs.metrics.track_in_flight(lambda: len(ctx.incoming))

    def register(server: grpc.aio.Server) -> None:
        service = MigrationDestinationService(ctx)
        pb_grpc.add_MigrationDestinationServiceServicer_to_server(service, server)
        # TunnelBytes is declared in the proto but not protobuf-encoded: a generic handler
        # without (de)serializers, so its messages reach the handler as the bytes they are
        # (common/tunnelwire.py); the generated servicer would parse them.
        carry = grpc.stream_stream_rpc_method_handler(service.TunnelBytes)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    tunnelwire.SERVICE, {tunnelwire.METHOD_NAME: carry}
                ),
            )
        )

    try:
        async with (
            grpc_server(
                config,
                register,
                ("vmmigrate.v1.MigrationDestinationService", tunnelwire.SERVICE),
                lambda: _housekeeping(ctx),
                gate=ctx.gate,
                tls=tls,
                on_refused=obs.metrics.refused,
                policy=DSTD_POLICY,
            ) as address,
            offers_warmed(hypervisor.settings, release_freed_memory),
        ):
            with serving_metrics(obs, config.metrics_listen):
                yield address, ctx
    finally:
        await ctx.hypervisor.close()
