"""Tunnelled migration, source side: the emulator's migration stream goes through srcd.

srcd listens on a loopback port of its own; the source emulator migrates to it; every byte
is carried to the destination's dstd over one bidirectional gRPC stream (the daemons' own
connection), where dstd hands it to the incoming emulator. The two emulators never connect
to each other. Bytes flowing back (simvm's acknowledgement) take the same way back.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import grpc.aio
import structlog

from common.errors import OperationFailed
from common.rpc import translate
from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

log = structlog.get_logger("vmmigrate.srcd.tunnel")

CHUNK = 4 * 1024 * 1024
# The stream reader's buffer bounds how much one read returns: a big one means few, large
# gRPC messages (the per-message cost dominates the tunnel's throughput).
READ_BUFFER = 8 * 1024 * 1024


class SourceTunnel:
    def __init__(
        self,
        stub: pb_grpc.MigrationDestinationServiceStub,
        peer: str,
        migration_id: str,
        deadline_s: float,
    ) -> None:
        self._stub = stub
        self._peer = peer
        self._mid = migration_id
        self._deadline_s = deadline_s
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._accepted = asyncio.Event()
        self.bytes_up = 0
        self.error: BaseException | None = None

    async def open(self) -> str:
        """Start listening; returns the URI the source emulator migrates to."""
        self._server = await asyncio.start_server(
            self._on_connect, "127.0.0.1", 0, limit=READ_BUFFER
        )
        port = self._server.sockets[0].getsockname()[1]
        return f"tcp:127.0.0.1:{port}"

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._accepted.is_set():  # one stream per migration
            writer.close()
            return
        self._accepted.set()
        assert self._server is not None
        self._server.close()
        self._task = asyncio.current_task()
        open_stream: Any = self._stub.Tunnel  # writes go through call.write()
        call: Any = open_stream(timeout=self._deadline_s)
        try:
            await call.write(pb.TunnelChunk(migration_id=self._mid))
            down = asyncio.ensure_future(self._downstream(call, writer))
            try:
                while True:
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    self.bytes_up += len(data)
                    await call.write(pb.TunnelChunk(data=data))
                await call.write(pb.TunnelChunk(eof=True))
                await call.done_writing()
                await down
            finally:
                down.cancel()
        except grpc.aio.AioRpcError as err:
            self.error = translate(err, self._peer, "destination host")
            log.warning("tunnel_failed", migration_id=self._mid, error=str(self.error))
        except (OSError, asyncio.CancelledError) as exc:
            self.error = exc
        finally:
            call.cancel()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _downstream(self, call: Any, writer: asyncio.StreamWriter) -> None:
        async for chunk in call:
            if chunk.data:
                writer.write(chunk.data)
                await writer.drain()
            if chunk.eof:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return

    def check(self) -> None:
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise OperationFailed(f"tunnelled migration stream failed: {self.error}")

    async def drain(self, timeout: float) -> None:
        """After the emulator reported completion: let every byte it wrote reach the
        destination before the stream is torn down (cancelling would drop what is still
        buffered here or in gRPC, and the destination would fail to load the state)."""
        if self._task is None or self._task.done():
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            log.warning("tunnel_drain_timeout", migration_id=self._mid)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
