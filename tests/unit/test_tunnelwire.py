"""The tunnel's wire helpers (common/tunnelwire.py): the relay (order, end, errors, overlap)
and the framing the proto states for TunnelBytes.Carry."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from vmmigrate.common import tunnelwire


async def _chunks(items: list[bytes], fail: Exception | None = None) -> AsyncIterator[bytes]:
    for item in items:
        await asyncio.sleep(0)
        yield item
    if fail is not None:
        raise fail


def test_relay_carries_every_chunk_in_order_and_counts_them() -> None:
    items = [bytes([i]) * (i + 1) for i in range(50)]
    out: list[bytes] = []

    async def write(data: bytes) -> None:
        await asyncio.sleep(0)
        out.append(data)

    total = asyncio.run(tunnelwire.relay(_chunks(items), write))
    assert out == items
    assert total == sum(len(i) for i in items)


def test_relay_stops_at_an_empty_chunk() -> None:
    out: list[bytes] = []

    async def write(data: bytes) -> None:
        out.append(data)

    total = asyncio.run(tunnelwire.relay(_chunks([b"ab", b"", b"never"]), write))
    assert out == [b"ab"]
    assert total == 2


def test_relay_raises_a_read_error_after_writing_what_came_before() -> None:
    out: list[bytes] = []

    async def write(data: bytes) -> None:
        out.append(data)

    with pytest.raises(ConnectionResetError, match="peer reset"):
        asyncio.run(
            tunnelwire.relay(_chunks([b"a", b"b"], ConnectionResetError("peer reset")), write)
        )
    assert out == [b"a", b"b"]


def test_relay_write_error_stops_the_reader() -> None:
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        while True:
            read += 1
            await asyncio.sleep(0)
            yield b"x"

    async def write(data: bytes) -> None:
        raise BrokenPipeError("sink closed")

    async def main() -> None:
        with pytest.raises(BrokenPipeError):
            await tunnelwire.relay(endless(), write, depth=2)
        # the reader was cancelled: wait for it to end (a reader still running would go on
        # counting, and would still be pending here)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            _, pending = await asyncio.wait(others, timeout=5)
            assert not pending, pending

    asyncio.run(main())
    assert read <= 4  # the chunk written, the queue's two, the one being put


def test_relay_reads_ahead_while_a_write_is_under_way() -> None:
    """The point of the relay: the next chunk is read while one is being written."""
    events: list[str] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                events.append(f"read {i}")
                yield bytes([i])
            gate.set()

        async def write(data: bytes) -> None:
            events.append(f"write {data[0]} start")
            if data == b"\x00":
                await gate.wait()  # the first write only ends once every chunk was read
            events.append(f"write {data[0]} end")

        await asyncio.wait_for(tunnelwire.relay(chunks(), write, depth=2), 5)

    asyncio.run(main())
    assert events.index("read 2") < events.index("write 0 end")


def test_socket_chunks_yields_until_eof() -> None:
    async def main() -> list[bytes]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(b"hello ")
        b.sendall(b"world")
        b.close()
        loop = asyncio.get_running_loop()
        got = [c async for c in tunnelwire.socket_chunks(loop, a)]
        a.close()
        return got

    assert b"".join(asyncio.run(main())) == b"hello world"


def test_the_wire_names_come_from_the_proto() -> None:
    """The method path is the proto's TunnelBytes.Carry, a stream both ways; a rename in the
    proto would move the wire name, which old peers would no longer find."""
    from vmmigrate.v1 import vmmigrate_pb2 as pb

    carry = pb.DESCRIPTOR.services_by_name["TunnelBytes"].methods_by_name["Carry"]
    assert carry.client_streaming and carry.server_streaming
    assert (carry.input_type.name, carry.output_type.name) == ("TunnelData", "TunnelFrame")
    assert tunnelwire.METHOD == "/vmmigrate.v1.TunnelBytes/Carry"
    assert (tunnelwire.SERVICE, tunnelwire.METHOD_NAME) == ("vmmigrate.v1.TunnelBytes", "Carry")


def test_frames_round_trip_as_the_proto_states() -> None:
    assert tunnelwire.credit_frame(0x0102030405060708) == b"\x01\x01\x02\x03\x04\x05\x06\x07\x08"
    assert tunnelwire.parse_frame(tunnelwire.credit_frame(2**64 - 1)) == (b"", 2**64 - 1)
    assert tunnelwire.data_frame(b"ack") == b"\x00ack"
    assert tunnelwire.parse_frame(tunnelwire.data_frame(b"ack")) == (b"ack", None)
    assert tunnelwire.data_frame(b"") == tunnelwire.EOF == b""


@pytest.mark.parametrize("msg", [b"\x02data", b"\x01short", b"\x01" + b"\x00" * 9, b""])
def test_a_malformed_frame_is_refused(msg: bytes) -> None:
    with pytest.raises(ValueError, match="unknown tunnel frame"):
        tunnelwire.parse_frame(msg)
