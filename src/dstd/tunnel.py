"""Tunnelled migration, destination side: the stream arrives over gRPC and goes to the
incoming emulator, which listens on loopback only; bytes it sends back (simvm's
acknowledgement) return the same way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from common.errors import InvalidArgument, OperationFailed, OperationInvalid
from dstd.context import DestinationContext
from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.dstd.tunnel")

CHUNK = 4 * 1024 * 1024
READ_BUFFER = 8 * 1024 * 1024


async def carry_tunnel(
    ctx: DestinationContext, chunks: AsyncIterator[pb.TunnelChunk]
) -> AsyncIterator[pb.TunnelChunk]:
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        raise InvalidArgument("empty tunnel stream") from None
    job = ctx.incoming.find(first.migration_id)
    if job is None or not job.tunnelled or not job.port:
        raise OperationInvalid(f"no tunnelled incoming migration with id '{first.migration_id}'")
    structlog.contextvars.bind_contextvars(migration_id=job.migration_id)
    try:
        reader, writer = await asyncio.open_connection(job.host, job.port, limit=READ_BUFFER)
    except OSError as exc:
        raise OperationFailed(f"cannot reach the incoming emulator: {exc}") from exc
    received = 0

    async def upstream() -> None:
        nonlocal received
        if first.data:
            writer.write(first.data)
        async for chunk in chunks:
            if chunk.data:
                received += len(chunk.data)
                writer.write(chunk.data)
                await writer.drain()
            if chunk.eof:
                break
        with contextlib.suppress(OSError):
            writer.write_eof()

    up = asyncio.ensure_future(upstream())
    try:
        while True:
            try:
                data = await reader.read(CHUNK)
            except OSError as exc:  # the emulator reset the connection (a stream it refused)
                raise OperationFailed(f"incoming emulator closed the tunnel: {exc}") from exc
            if not data:
                break
            yield pb.TunnelChunk(data=data)
        yield pb.TunnelChunk(eof=True)
        with contextlib.suppress(OSError, ConnectionError):
            await up
    finally:
        up.cancel()
        writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await writer.wait_closed()
        log.info("tunnel_closed", bytes=received)
