"""Tunnelled migration, destination side: the stream arrives over gRPC and goes to the
incoming emulator, which listens on a unix socket only; bytes it sends back (simvm's
acknowledgement) return the same way, framed, with credit (common/tunnelwire.py).
The stream is validated before a byte goes to the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import structlog
from vmmigrate.common import tunnelwire
from vmmigrate.common.errors import InvalidArgument, OperationFailed, OperationInvalid
from vmmigrate.dstd.context import DestinationContext

log = structlog.get_logger("vmmigrate.dstd.tunnel")


def tunnel_target(ctx: DestinationContext, migration_id: str, channel: str) -> str:
    """The unix socket a stream of ``channel`` goes to: the incoming emulator's migration
    socket (the memory, no channel), or its NBD server (one disk of a storage copy)."""
    if channel not in ("", tunnelwire.CHANNEL_NBD):
        raise InvalidArgument(f"unknown tunnel channel '{channel}'")
    job = ctx.incoming.find(migration_id)
    if job is None or not job.tunnelled or not job.path:
        raise OperationInvalid(f"no tunnelled incoming migration with id '{migration_id}'")
    structlog.contextvars.bind_contextvars(migration_id=job.migration_id)
    if channel == tunnelwire.CHANNEL_NBD:
        if not job.nbd_path:
            raise OperationInvalid(f"incoming migration '{migration_id}' copies no storage")
        return job.nbd_path
    return job.path


async def _connect(loop: asyncio.AbstractEventLoop, path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tunnelwire.bounded(sock, socket.SO_SNDBUF).setblocking(False)
        await loop.sock_connect(sock, path)
    except OSError as exc:
        sock.close()
        raise OperationFailed(f"cannot reach the incoming emulator: {exc}") from exc
    return sock


_DONE = object()


class _Upstream:
    """The source's bytes to the emulator, with a credit frame (the total handed to the
    emulator) put on ``out`` once per CREDIT_STEP and at the end (common/tunnelwire.py)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, out: asyncio.Queue[Any]
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.out = out
        self.received = 0
        self.credited = 0

    def give_credit(self) -> None:
        if self.received > self.credited:
            self.out.put_nowait(tunnelwire.credit_frame(self.received))
            self.credited = self.received

    async def deliver(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)
        self.received += len(data)
        if self.received - self.credited >= tunnelwire.CREDIT_STEP:  # per MiB, not per read
            self.give_credit()

    async def run(self, incoming: AsyncIterator[bytes]) -> None:
        await tunnelwire.relay(incoming, self.deliver)
        self.give_credit()  # the rest: the source waits for every byte to be credited
        tunnelwire.shutdown_write(self.sock)


async def _downstream(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, out: asyncio.Queue[Any]
) -> None:
    """What the emulator sends back, as data frames on ``out``, then _DONE (or an error)."""
    try:
        while True:
            data = await tunnelwire.recv_chunk(loop, sock)
            if not data:
                break
            out.put_nowait(tunnelwire.data_frame(data))
    except OSError as exc:  # the emulator reset the connection (a stream it refused)
        out.put_nowait(OperationFailed(f"incoming emulator closed the tunnel: {exc}"))
        return
    out.put_nowait(_DONE)


async def _pump(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    incoming: AsyncIterator[bytes],
) -> AsyncGenerator[bytes, None]:
    """Carry ``incoming`` (b"" = EOF) to the emulator, and what it sends back out as data
    frames, with credit frames among them. Ends after the emulator closed its side and every
    incoming byte was delivered."""
    out: asyncio.Queue[Any] = asyncio.Queue()  # the emulator sends back next to nothing
    upstream = _Upstream(loop, sock, out)
    up = asyncio.ensure_future(upstream.run(incoming))
    down = asyncio.ensure_future(_downstream(loop, sock, out))
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
        yield tunnelwire.EOF
    finally:
        up.cancel()
        down.cancel()
        sock.close()
        log.info("tunnel_closed", bytes=upstream.received)


async def carry_tunnel_bytes(
    ctx: DestinationContext, migration_id: str, chunks: AsyncIterator[bytes], channel: str = ""
) -> AsyncIterator[bytes]:
    """TunnelBytes.Carry: ``chunks`` are the stream's bytes, the id (and the channel, for
    a disk's NBD connection) came in the call's metadata; what goes back is framed (data
    and credit)."""
    path = tunnel_target(ctx, migration_id, channel)
    loop = asyncio.get_running_loop()
    sock = await _connect(loop, path)
    async with contextlib.aclosing(_pump(loop, sock, chunks)) as pump:
        async for msg in pump:
            yield msg
