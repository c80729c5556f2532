"""Tunnelled migration, destination side: the stream arrives over gRPC and goes to the
incoming emulator, which listens on a unix socket only; bytes it sends back (simvm's
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
from vmmigrate.common import tunnelwire
from vmmigrate.common.errors import InvalidArgument, OperationFailed, OperationInvalid
from vmmigrate.dstd.context import DestinationContext
from vmmigrate.dstd.incoming import IncomingJob

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.dstd.tunnel")


def _tunnelled_job(ctx: DestinationContext, migration_id: str) -> IncomingJob:
    job = ctx.incoming.find(migration_id)
    if job is None or not job.tunnelled or not job.path:
        raise OperationInvalid(f"no tunnelled incoming migration with id '{migration_id}'")
    structlog.contextvars.bind_contextvars(migration_id=job.migration_id)
    return job


async def _connect(loop: asyncio.AbstractEventLoop, job: IncomingJob) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tunnelwire.bounded(sock, socket.SO_SNDBUF).setblocking(False)
        await loop.sock_connect(sock, job.path)
    except OSError as exc:
        sock.close()
        raise OperationFailed(f"cannot reach the incoming emulator: {exc}") from exc
    return sock


_DONE = object()


async def _pump(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    incoming: AsyncIterator[bytes],
    wrap: Callable[[bytes], Any],
    credit: Callable[[int], Any] | None = None,
) -> AsyncGenerator[Any, None]:
    """Carry ``incoming`` (b"" = EOF) to the emulator, and what it sends back out, wrapped;
    with ``credit``, also a credit message (the total handed to the emulator) once per
    CREDIT_STEP and at the end (common/tunnelwire.py). Ends after the emulator closed its
    side and every incoming byte was delivered."""
    received = credited = 0
    out: asyncio.Queue[Any] = asyncio.Queue()  # the emulator sends back next to nothing

    def give_credit() -> None:
        nonlocal credited
        if credit is not None and received > credited:
            out.put_nowait(credit(received))
            credited = received

    async def deliver(data: bytes) -> None:
        nonlocal received
        await loop.sock_sendall(sock, data)
        received += len(data)
        if received - credited >= tunnelwire.CREDIT_STEP:  # a message per MiB, not per read
            give_credit()

    async def upstream() -> None:
        await tunnelwire.relay(incoming, deliver)
        give_credit()  # the rest: the source waits for every byte to be credited
        tunnelwire.shutdown_write(sock)

    async def downstream() -> None:
        try:
            while True:
                data = await tunnelwire.recv_chunk(loop, sock)
                if not data:
                    break
                out.put_nowait(wrap(data))
        except OSError as exc:  # the emulator reset the connection (a stream it refused)
            out.put_nowait(OperationFailed(f"incoming emulator closed the tunnel: {exc}"))
            return
        out.put_nowait(_DONE)

    up = asyncio.ensure_future(upstream())
    down = asyncio.ensure_future(downstream())
    try:
        while True:
            item = await out.get()
            if item is _DONE:
                break
            if isinstance(item, Exception):
                raise item
            yield item
        try:
            await up
        except OSError as exc:
            # it closed before taking every byte (on a unix socket the writer hears of it,
            # not the reader): the same failure as a reset seen while reading
            raise OperationFailed(f"incoming emulator closed the tunnel: {exc}") from exc
        while not out.empty():  # credit given after the emulator closed its side
            yield out.get_nowait()
        yield wrap(tunnelwire.EOF)
    finally:
        up.cancel()
        down.cancel()
        sock.close()
        log.info("tunnel_closed", bytes=received)


async def carry_tunnel_bytes(
    ctx: DestinationContext, migration_id: str, chunks: AsyncIterator[bytes], *, credit: bool
) -> AsyncIterator[bytes]:
    """TunnelBytes: messages are the stream's bytes; the id came in the call's metadata.
    With ``credit`` (the source asked for it), messages back are framed and carry credit."""
    job = _tunnelled_job(ctx, migration_id)
    loop = asyncio.get_running_loop()
    sock = await _connect(loop, job)
    pump = (
        _pump(loop, sock, chunks, _framed, tunnelwire.credit_frame)
        if credit
        else _pump(loop, sock, chunks, _as_is)
    )
    async with contextlib.aclosing(pump):
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


def _framed(data: bytes) -> bytes:
    return tunnelwire.FRAME_DATA + data if data else tunnelwire.EOF


def _to_chunk(data: bytes) -> pb.TunnelChunk:
    return pb.TunnelChunk(data=data) if data else pb.TunnelChunk(eof=True)
