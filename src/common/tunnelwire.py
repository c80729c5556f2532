"""The tunnel's byte stream on the wire, shared by srcd (which opens it) and dstd (which
serves it), and the socket I/O both use to feed it.

The stream is ``TunnelBytes.Carry`` (proto/vmmigrate/v1/vmmigrate.proto states its framing
exactly): a gRPC bidirectional stream declared in the proto but carried without protobuf
around its messages. dstd serves it with a generic handler with no (de)serializers and srcd
calls it without serializers, so no message is built or parsed per chunk: a protobuf-typed
stream of the same bytes copies every chunk once more on each side and measured slower
(bench/bench_tunnel.py). The migration id travels in the call's metadata
(:data:`MIGRATION_ID_KEY`), so dstd validates the stream before any byte flows. srcd's
messages are the emulator's bytes as they are; an empty one means "the sender closed its
side", as does the end of the request stream. dstd's messages are framed
(:func:`parse_frame`): data the incoming emulator sent back, or credit.

The tunnel is CPU-bound in the two daemons (docs/PERFORMANCE.md): every copy and every
await per chunk counts, hence raw sockets (``sock_recv`` straight into the bytes handed to
gRPC, ``sock_sendall`` straight from the bytes gRPC handed over) instead of asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from vmmigrate.v1 import vmmigrate_pb2 as pb

# The names come from the proto's declaration, so that the contract lives in one place.
_CARRY = pb.DESCRIPTOR.services_by_name["TunnelBytes"].methods_by_name["Carry"]
SERVICE = _CARRY.containing_service.full_name  # vmmigrate.v1.TunnelBytes
METHOD_NAME = _CARRY.name
METHOD = f"/{SERVICE}/{METHOD_NAME}"
MIGRATION_ID_KEY = "vmmigrate-migration-id"
# What one stream carries: the memory (no key, as before), or one disk's NBD connection of a
# tunnelled storage copy (docs/ARCHITECTURE.md section 14).
CHANNEL_KEY = "vmmigrate-channel"
CHANNEL_NBD = "nbd"
EOF = b""

# Credit (flow control): every message from dstd is a frame. A data frame is FRAME_DATA +
# the incoming emulator's bytes; a credit frame is FRAME_CREDIT + the total bytes handed to
# the incoming emulator so far (8 bytes, big-endian); EOF stays empty. srcd keeps at most
# CREDIT_WINDOW bytes sent but not yet handed over: without a bound, gRPC's buffers and
# windows may hold many MiB, all of which must cross after the source emulator's
# switch-over, with the guest paused; and with credit srcd knows when every byte is over,
# so Finish need not wait for the stream to close. 8 MiB: 4 MiB stalled the pipeline
# (dstd's relay alone holds up to 3 MiB), and 8 MiB gave the shortest pauses and the best
# throughput of 4, 8 and no credit (bench_live, docs/PERFORMANCE.md). Measured again once
# the source emulator wrote to a unix socket (issue 12): 2, 3, 4 and 6 MiB gave no pause
# shorter beyond the noise, and 3 MiB cost 15 % of the throughput on a quiet machine
# (docs/PERFORMANCE.md, "The pause after QEMU's completion").
FRAME_DATA = b"\x00"
FRAME_CREDIT = b"\x01"
CREDIT_WINDOW = 8 * 1024 * 1024
# dstd credits at most once per CREDIT_STEP delivered (and once at the end), not once per
# socket write (often 64-256 KiB): fewer messages for the same bound
CREDIT_STEP = 1024 * 1024


def credit_frame(delivered: int) -> bytes:
    return FRAME_CREDIT + delivered.to_bytes(8, "big")


def data_frame(data: bytes) -> bytes:
    """dstd's message for ``data`` from the incoming emulator (b"": its EOF, unframed)."""
    return FRAME_DATA + data if data else EOF


def parse_frame(msg: bytes) -> tuple[bytes, int | None]:
    """(data, credit) of one framed message from dstd; credit is None for data."""
    if msg[:1] == FRAME_CREDIT and len(msg) == 9:
        return b"", int.from_bytes(msg[1:], "big")
    if msg[:1] == FRAME_DATA:
        return msg[1:], None
    raise ValueError(f"unknown tunnel frame (type {msg[:1]!r}, {len(msg)} bytes)")


# Largest chunk one socket read returns, so the largest gRPC message. 1 MiB measured
# faster than 4 MiB on loopback (fewer bytes queued per message, same per-message cost
# amortized), and it bounds what is in flight when the emulator completes.
CHUNK = 1024 * 1024


# Kernel buffer of the sockets to and from the emulators. Every byte buffered on the way
# when the source emulator reports completion still has to cross while the guest is paused,
# so these are fixed (autotuning grows them to several MiB each) at what keeps the pumps fed.
SOCKET_BUFFER = 1024 * 1024


def bounded(sock: socket.socket, option: int) -> socket.socket:
    """Fix one of the socket's kernel buffers (SO_RCVBUF / SO_SNDBUF) at SOCKET_BUFFER;
    before listen() or connect(), so that TCP sizes its window for it."""
    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    return sock


def nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# Chunks a relay reads ahead of its writes (see relay()): 2 keeps a read under way while a
# chunk is written, and adds at most 2 MiB to what is in flight at completion.
RELAY_DEPTH = 2

_END = object()


async def relay(
    chunks: AsyncIterator[bytes],
    write: Callable[[bytes], Awaitable[object]],
    depth: int = RELAY_DEPTH,
) -> int:
    """Carry ``chunks`` (ended by their end or an empty chunk) to ``write``; returns the
    bytes carried. Reading and writing overlap: the next chunk is being read (from the
    emulator's socket, or from gRPC, which asks its peer for more only while a read is
    pending) while one is written, instead of each side waiting for the other in turn.
    A read's error is raised here, after the chunks before it were written."""
    queue: asyncio.Queue[object] = asyncio.Queue(depth)

    async def read() -> None:
        try:
            async for data in chunks:
                if not data:
                    break
                await queue.put(data)
            await queue.put(_END)
        except Exception as exc:  # handed to the writer, which raises it in order
            await queue.put(exc)

    reader = asyncio.ensure_future(read())
    total = 0
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return total
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, bytes)
            await write(item)
            total += len(item)
    finally:
        reader.cancel()


async def socket_chunks(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> AsyncIterator[bytes]:
    """The socket's bytes, a chunk per read, until EOF."""
    while True:
        data = await recv_chunk(loop, sock)
        if not data:
            return
        yield data


async def recv_chunk(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Whatever the socket has, up to CHUNK bytes (b"" at EOF): one kernel copy into the
    very bytes object gRPC sends."""
    return await loop.sock_recv(sock, CHUNK)


def shutdown_write(sock: socket.socket) -> None:
    """Pass an EOF on (the emulator on this side sees its peer close)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
