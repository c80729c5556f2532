"""Tunnelled migration, source side: the emulator's migration stream goes through srcd.

srcd listens on a loopback port of its own; the source emulator migrates to it; every byte
is carried to the destination's dstd over one bidirectional gRPC stream (the daemons' own
connection), where dstd hands it to the incoming emulator. The two emulators never connect
to each other. Bytes flowing back (simvm's acknowledgement) take the same way back.

The stream is ``TunnelBytes.Carry`` (raw bytes, the migration id in metadata; dstd's
messages framed, with credit: common/tunnelwire.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
import structlog
from vmmigrate.common import tunnelwire
from vmmigrate.common.errors import OperationFailed
from vmmigrate.common.rpc import translate

log = structlog.get_logger("vmmigrate.srcd.tunnel")


def _listening(
    family: socket.AddressFamily, bind: Callable[[socket.socket], object], backlog: int
) -> socket.socket:
    """A non-blocking stream socket of ``family``, made ready and bound by ``bind``, listening;
    closed again if any step fails."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        bind(listener)
        listener.listen(backlog)
    except OSError:
        listener.close()
        raise
    return listener


class SourceTunnel:
    def __init__(
        self,
        open_stream: Callable[..., Any],
        peer: str,
        migration_id: str,
        deadline_s: float,
        channel: str = "",
        *,
        path: str = "",
        emulator_gid: int | None = None,
    ) -> None:
        """``open_stream``: the TunnelBytes.Carry stream-stream callable, without
        serializers (PeerPool.tunnel_bytes). ``channel``: what the stream carries when it
        is not the memory (tunnelwire.CHANNEL_NBD: one disk's NBD connection). ``path``:
        the unix socket the source emulator migrates to (in srcd's private socket
        directory, group ``emulator_gid`` when the emulators run as another user);
        without it, a loopback TCP port."""
        self._open_stream = open_stream
        self._path = path
        self._gid = emulator_gid
        self._peer = peer
        self._mid = migration_id
        self._channel = channel
        self._acked = 0  # bytes the destination handed to its emulator (credit)
        self._credit = asyncio.Event()
        self._credit_open = True
        self._written = False  # every byte from the emulator went to gRPC, then EOF
        self.drained = False  # drain() saw every byte handed over, the stream still open
        self._deadline_s = deadline_s
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self.bytes_up = 0
        self.error: BaseException | None = None

    async def open(self) -> str:
        """Start listening; returns the URI the source emulator migrates to.

        A unix socket when a path was given: what the emulator has written but srcd has
        not read yet is bounded by the emulator's send buffer (about 200 KiB), where a
        loopback TCP connection autotunes its buffers to several MiB, all of which must
        cross after the switch-over with the guest paused; and the kernel's unix path
        costs less CPU per byte than TCP's (the tunnel is CPU-bound)."""
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            listener = _listening(socket.AF_UNIX, self._bind_unix, 1)
            uri = f"unix:{self._path}"
        else:

            def bind(sock: socket.socket) -> None:
                tunnelwire.bounded(sock, socket.SO_RCVBUF).bind(("127.0.0.1", 0))

            listener = _listening(socket.AF_INET, bind, 1)  # one stream per migration
            uri = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        self._listener = listener
        self._task = asyncio.ensure_future(self._serve(listener))
        return uri

    def _bind_unix(self, sock: socket.socket) -> None:
        tunnelwire.bounded(sock, socket.SO_RCVBUF).bind(self._path)
        if self._gid is not None:  # an emulator that runs as another user connects too
            os.chown(self._path, -1, self._gid)
            os.chmod(self._path, 0o660)

    async def _serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await loop.sock_accept(listener)
        finally:
            listener.close()  # one stream per migration: later connections are refused
            self._unlink()
        self._connected = True
        conn.setblocking(False)
        if conn.family != socket.AF_UNIX:
            tunnelwire.nonblocking(conn)
        await self._carry(loop, conn)

    def _unlink(self) -> None:
        if self._path:
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    async def carry(self, conn: socket.socket) -> None:
        """Carry one connection accepted elsewhere (the NBD tunnel's), until it ends."""
        self._connected = True
        await self._carry(asyncio.get_running_loop(), conn)

    async def _carry(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        metadata: tuple[tuple[str, str], ...] = ((tunnelwire.MIGRATION_ID_KEY, self._mid),)
        if self._channel:
            metadata += ((tunnelwire.CHANNEL_KEY, self._channel),)
        call: Any = self._open_stream(timeout=self._deadline_s, metadata=metadata)
        try:
            down = asyncio.ensure_future(self._downstream(loop, call, conn))

            async def send(data: bytes) -> None:
                # at most CREDIT_WINDOW (plus this chunk) not yet handed to the emulator
                while self._credit_open and self.bytes_up - self._acked >= tunnelwire.CREDIT_WINDOW:
                    self._credit.clear()
                    await self._credit.wait()
                self.bytes_up += len(data)
                await call.write(data)

            try:
                await tunnelwire.relay(tunnelwire.socket_chunks(loop, conn), send)
                await call.write(tunnelwire.EOF)
                await call.done_writing()
                self._written = True
                self._credit.set()  # drain() may be waiting for this
                await down
            finally:
                down.cancel()
        except grpc.aio.AioRpcError as err:
            self.error = translate(err, self._peer, "destination host")
            log.warning("tunnel_failed", migration_id=self._mid, error=str(self.error))
        except (OSError, ValueError, asyncio.CancelledError) as exc:  # ValueError: a bad frame
            self.error = exc
        finally:
            call.cancel()
            conn.close()

    async def _downstream(
        self, loop: asyncio.AbstractEventLoop, call: Any, conn: socket.socket
    ) -> None:
        try:
            async for msg in call:
                if not msg:  # the incoming emulator closed its side
                    tunnelwire.shutdown_write(conn)
                    return
                data, credit = tunnelwire.parse_frame(msg)
                if credit is not None:
                    self._acked = max(self._acked, credit)
                    self._credit.set()
                if data:
                    await loop.sock_sendall(conn, data)
        finally:
            # no more credit will come: the sender stops waiting for it (the stream's end
            # or error is then what it meets)
            self._credit_open = False
            self._credit.set()

    def check(self) -> None:
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise OperationFailed(f"tunnelled migration stream failed: {self.error}")

    async def drain(self, timeout: float) -> None:
        """After the emulator reported completion: let every byte it wrote reach the
        destination before the stream is torn down (cancelling would drop what is still
        buffered here or in gRPC, and the destination would fail to load the state)."""
        if self._task is None or self._task.done() or not self._connected:
            return
        # what is still on the way when the emulator says it is done: the guest is paused
        # until it has crossed (sent: read from the emulator and handed to gRPC; credited:
        # handed to the incoming emulator, when the destination reports it)
        sent, credited, started = self.bytes_up, self._acked, time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self._delivered(self._task)
        except TimeoutError:
            log.warning("tunnel_drain_timeout", migration_id=self._mid)
        log.info(
            "tunnel_drained",
            migration_id=self._mid,
            sent_at_completion=sent,
            credited_at_completion=credited,
            total=self.bytes_up,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _delivered(self, task: asyncio.Task[None]) -> None:
        """Until the destination reports every byte handed to the incoming
        emulator (or the stream ended). The stream itself ends only when that emulator
        closes its side, which Finish need not wait for: it waits for the emulator's own
        completion, as in a direct migration."""
        while not task.done() and not (self._written and self._acked >= self.bytes_up):
            self._credit.clear()
            waiter = asyncio.ensure_future(self._credit.wait())
            try:
                await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        self.drained = not task.done()

    async def linger(self, timeout: float) -> None:
        """After a drain: let the stream end by itself (the incoming emulator
        closes it), for at most ``timeout`` seconds, then close. Tearing it down at once
        could reset a connection whose last bytes the emulator has not read yet."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
        await self.close()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._unlink()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class NbdTunnel:
    """Tunnelled storage copy, source side: the source emulator's NBD clients (one per
    copied disk) connect to a unix socket of srcd's, in its private socket directory; each
    connection is carried on a ``TunnelBytes.Carry`` stream of its own (channel "nbd") to
    dstd, which connects it to the incoming emulator's NBD server. The memory's tunnel is
    separate and unchanged."""

    def __init__(
        self,
        open_stream: Callable[..., Any],
        peer: str,
        migration_id: str,
        deadline_s: float,
        *,
        path: str,
        emulator_gid: int | None = None,
    ) -> None:
        # each accepted connection is carried by a SourceTunnel of its own (channel nbd)
        self._new_carrier = functools.partial(
            SourceTunnel, open_stream, peer, migration_id, deadline_s, tunnelwire.CHANNEL_NBD
        )
        self._mid = migration_id
        self.path = path
        self._gid = emulator_gid
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._carriers: list[tuple[SourceTunnel, asyncio.Task[None]]] = []

    async def open(self) -> dict[str, Any]:
        """Listen; returns the QMP address the emulator's NBD clients connect to."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = _listening(socket.AF_UNIX, self._bind, 8)
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept(listener))
        return {"type": "unix", "path": self.path}

    def _bind(self, listener: socket.socket) -> None:
        listener.bind(self.path)
        if self._gid is not None:  # emulators that run as another user connect too
            os.chown(self.path, -1, self._gid)
            os.chmod(self.path, 0o660)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # closed under it: the copy is over
                log.debug("nbd_tunnel_accept_ended", migration_id=self._mid, error=str(exc))
                return
            conn.setblocking(False)
            carrier = self._new_carrier()
            self._carriers.append((carrier, asyncio.ensure_future(carrier.carry(conn))))

    def check(self) -> None:
        """A broken disk stream is the real cause of a failed copy: say so."""
        for carrier, _ in self._carriers:
            if carrier.error is not None and not isinstance(carrier.error, asyncio.CancelledError):
                raise OperationFailed(f"tunnelled storage copy failed: {carrier.error}")

    async def close(self) -> None:
        """Stop listening and end every stream (the mirrors are over, or failed)."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        for _, task in self._carriers:
            task.cancel()
        for _, task in self._carriers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        log.info("nbd_tunnel_closed", migration_id=self._mid, streams=len(self._carriers))
