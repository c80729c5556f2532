"""srcd's SourceTunnel (srcd/tunnel.py) on a unix socket: the source emulator's end of a
tunnelled migration, without gRPC (a fake stream stands in for TunnelBytes.Carry)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

from vmmigrate.common import tunnelwire
from vmmigrate.srcd.tunnel import SourceTunnel


class FakeCall:
    """The Carry stream as srcd sees it: what it writes, and dstd's frames (credit for
    every byte, then the incoming emulator's EOF) once the writer is done."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.metadata: Any = None
        self._done = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def done_writing(self) -> None:
        self._done.set()

    def cancel(self) -> None:
        self._done.set()

    def __aiter__(self) -> Any:
        return self._frames()

    async def _frames(self) -> Any:
        await self._done.wait()
        yield tunnelwire.credit_frame(sum(len(d) for d in self.written))
        await asyncio.sleep(0.2)  # the incoming emulator closes its side a moment later
        yield tunnelwire.EOF


def test_the_emulator_migrates_to_a_unix_socket_that_goes_once_used(tmp_path: Path) -> None:
    path = tmp_path / "u.tunnel-out"
    calls: list[FakeCall] = []

    def open_stream(**kwargs: Any) -> FakeCall:
        calls.append(FakeCall())
        calls[-1].metadata = kwargs["metadata"]
        return calls[-1]

    async def scenario() -> tuple[str, int, bool, bool]:
        tunnel = SourceTunnel(open_stream, "peer", "m1", 10.0, path=str(path),
                              emulator_gid=os.getgid())
        uri = await tunnel.open()
        mode = stat.S_IMODE(os.stat(path).st_mode)
        payload = os.urandom(3 * tunnelwire.CHUNK + 123)
        loop = asyncio.get_running_loop()
        emu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        emu.setblocking(False)
        await loop.sock_connect(emu, str(path))
        await loop.sock_sendall(emu, payload)
        emu.shutdown(socket.SHUT_WR)
        await tunnel.drain(10.0)
        drained, gone = tunnel.drained, not path.exists()
        await tunnel.linger(5.0)
        assert await loop.sock_recv(emu, 1) == b""  # the incoming emulator's EOF came back
        emu.close()
        tunnel.check()
        assert b"".join(calls[0].written) == payload + tunnelwire.EOF
        return uri, mode, drained, gone

    uri, mode, drained, gone = asyncio.run(scenario())
    assert uri == f"unix:{path}"
    assert mode == 0o660  # an emulator running as another user (same group) connects too
    assert drained and gone  # every byte credited; the path went with the first connection
    assert len(calls) == 1 and calls[0].metadata == ((tunnelwire.MIGRATION_ID_KEY, "m1"),)


def test_a_tunnel_closed_unused_removes_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "u.tunnel-out"

    async def scenario() -> str:
        tunnel = SourceTunnel(lambda **kw: FakeCall(), "peer", "m1", 10.0, path=str(path))
        uri = await tunnel.open()
        assert path.exists()
        await tunnel.close()
        return uri

    assert asyncio.run(scenario()) == f"unix:{path}"
    assert not path.exists()


def test_without_a_path_it_listens_on_loopback_tcp() -> None:
    async def scenario() -> str:
        tunnel = SourceTunnel(lambda **kw: FakeCall(), "peer", "m1", 10.0)
        uri = await tunnel.open()
        await tunnel.close()
        return uri

    uri = asyncio.run(scenario())
    assert uri.startswith("tcp:127.0.0.1:") and int(uri.rsplit(":", 1)[1]) > 0
