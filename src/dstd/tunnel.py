"""Tunnelled migration, destination side: the stream arrives over gRPC and goes to the
incoming emulator, which listens on loopback only; bytes it sends back (simvm's
acknowledgement) return the same way.

Two encodings arrive here (common/tunnelwire.py): TunnelBytes (raw bytes, the migration id
in metadata) and the proto's Tunnel (TunnelChunk messages, the id in the first one). Both
are validated the same way before a byte goes to the emulator, and carried by one pump.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import structlog

from common import tunnelwire
from common.errors import InvalidArgument, OperationFailed, OperationInvalid
from dstd.context import DestinationContext
from dstd.incoming import IncomingJob
from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.dstd.tunnel")


def _tunnelled_job(ctx: DestinationContext, migration_id: str) -> IncomingJob:
    job = ctx.incoming.find(migration_id)
    if job is None or not job.tunnelled or not job.port:
        raise OperationInvalid(f"no tunnelled incoming migration with id '{migration_id}'")
    structlog.contextvars.bind_contextvars(migration_id=job.migration_id)
    return job


async def _connect(loop: asyncio.AbstractEventLoop, job: IncomingJob) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tunnelwire.nonblocking(tunnelwire.bounded(sock, socket.SO_SNDBUF))
        await loop.sock_connect(sock, (job.host, job.port))
    except OSError as exc:
        sock.close()
        raise OperationFailed(f"cannot reach the incoming emulator: {exc}") from exc
    return sock


async def _pump(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    incoming: AsyncIterator[bytes],
    wrap: Callable[[bytes], Any],
) -> AsyncGenerator[Any, None]:
    """Carry ``incoming`` (b"" = EOF) to the emulator, and what it sends back out, wrapped;
    ends after the emulator closed its side and every incoming byte was delivered."""
    received = 0

    async def deliver(data: bytes) -> None:
        nonlocal received
        received += len(data)
        await loop.sock_sendall(sock, data)

    async def upstream() -> None:
        await tunnelwire.relay(incoming, deliver)
        tunnelwire.shutdown_write(sock)

    up = asyncio.ensure_future(upstream())
    try:
        while True:
            try:
                data = await tunnelwire.recv_chunk(loop, sock)
            except OSError as exc:  # the emulator reset the connection (a stream it refused)
                raise OperationFailed(f"incoming emulator closed the tunnel: {exc}") from exc
            if not data:
                break
            yield wrap(data)
        yield wrap(tunnelwire.EOF)
        with contextlib.suppress(OSError):  # the emulator went away: Finish will tell
            await up
    finally:
        up.cancel()
        sock.close()
        log.info("tunnel_closed", bytes=received)


async def carry_tunnel_bytes(
    ctx: DestinationContext, migration_id: str, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """TunnelBytes: messages are the stream's bytes; the id came in the call's metadata."""
    job = _tunnelled_job(ctx, migration_id)
    loop = asyncio.get_running_loop()
    sock = await _connect(loop, job)
    async with contextlib.aclosing(_pump(loop, sock, chunks, _as_is)) as pump:
        async for data in pump:
            yield data


async def carry_tunnel(
    ctx: DestinationContext, chunks: AsyncIterator[pb.TunnelChunk]
) -> AsyncIterator[pb.TunnelChunk]:
    """The proto's Tunnel (sources that predate TunnelBytes)."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        raise InvalidArgument("empty tunnel stream") from None
    job = _tunnelled_job(ctx, first.migration_id)
    loop = asyncio.get_running_loop()
    sock = await _connect(loop, job)

    async def data() -> AsyncIterator[bytes]:
        if first.data:
            yield first.data
        async for chunk in chunks:
            if chunk.data:
                yield chunk.data
            if chunk.eof:
                return

    async with contextlib.aclosing(_pump(loop, sock, data(), _to_chunk)) as pump:
        async for msg in pump:
            yield msg


def _as_is(data: bytes) -> bytes:
    return data


def _to_chunk(data: bytes) -> pb.TunnelChunk:
    return pb.TunnelChunk(data=data) if data else pb.TunnelChunk(eof=True)
