"""A channel closed under a call (another migration reconnected to the peer) is the peer's
unavailability for the calls on it, never a cancellation of the migrations that made them:
grpc raises CancelledError in whoever awaits such a call, and an uncaught one ended an
evacuation's whole MigrateMany stream without a status (migctl waited to its deadline).
And srcd's reconnect retires the old channel instead of closing it under those calls.

Real grpc channels: a server that never answers (its handler waits), on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from vmmigrate.common.errors import PeerUnavailable, Timeout
from vmmigrate.common.rpc import call
from vmmigrate.srcd.batcher import Lane
from vmmigrate.srcd.context import PeerPool

from vmmigrate.v1 import vmmigrate_pb2 as pb

WHAT = "destination host"


class _Silent(grpc.GenericRpcHandler):
    """Every unary call waits (until its deadline, or its channel goes)."""

    def __init__(self) -> None:
        self.calls = 0
        self.arrived = asyncio.Event()

    def service(self, details: Any) -> grpc.RpcMethodHandler:
        async def wait(request: bytes, context: Any) -> bytes:
            self.calls += 1
            self.arrived.set()
            await asyncio.sleep(30)
            return b""

        return grpc.unary_unary_rpc_method_handler(wait)


@contextlib.asynccontextmanager
async def _silent() -> AsyncIterator[tuple[str, _Silent]]:
    handler = _Silent()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", handler
    finally:
        await server.stop(None)


def _method(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary("/vmmigrate.test.Silent/Wait", request_serializer=_bytes)


def _bytes(request: Any) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def test_a_call_whose_channel_closes_under_it_is_peer_unavailable() -> None:
    asyncio.run(_a_call_whose_channel_closes_under_it_is_peer_unavailable())


async def _a_call_whose_channel_closes_under_it_is_peer_unavailable() -> None:
    async with _silent() as silent:
        address, handler = silent
        channel = grpc.aio.insecure_channel(address)
        pending = asyncio.ensure_future(
            call(_method(channel), b"", timeout=20, peer=address, what=WHAT)
        )
        await asyncio.wait_for(handler.arrived.wait(), 10)
        await channel.close(None)
        with pytest.raises(PeerUnavailable, match="the connection was closed during the call"):
            await pending
        # and a call made on the closed channel afterwards
        with pytest.raises(PeerUnavailable, match=address):
            await call(_method(channel), b"", timeout=5, peer=address, what=WHAT)


def test_cancelling_the_caller_itself_is_still_a_cancellation() -> None:
    asyncio.run(_cancelling_the_caller_itself_is_still_a_cancellation())


async def _cancelling_the_caller_itself_is_still_a_cancellation() -> None:
    async with _silent() as silent:
        address, handler = silent
        channel = grpc.aio.insecure_channel(address)
        try:
            pending = asyncio.ensure_future(
                call(_method(channel), b"", timeout=20, peer=address, what=WHAT)
            )
            await asyncio.wait_for(handler.arrived.wait(), 10)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            assert pending.cancelled()
        finally:
            await channel.close(None)


def test_a_batch_call_whose_channel_closes_fails_every_item_as_unavailable() -> None:
    asyncio.run(_a_batch_call_whose_channel_closes_fails_every_item_as_unavailable())


async def _a_batch_call_whose_channel_closes_fails_every_item_as_unavailable() -> None:
    async with _silent() as silent:
        address, handler = silent
        channel = grpc.aio.insecure_channel(address)
        method = _method(channel)
        lane: Lane[pb.FinishRequest, pb.FinishResponse] = Lane(
            single=lambda: method,
            batch=lambda: method,
            wrap=lambda items: b"",
            unwrap=lambda answer: [],
            peer=address,
            what=WHAT,
        )
        first = asyncio.ensure_future(lane(pb.FinishRequest(), timeout=20))  # alone: single
        await asyncio.wait_for(handler.arrived.wait(), 10)
        handler.arrived.clear()
        rest = [asyncio.ensure_future(lane(pb.FinishRequest(), timeout=20)) for _ in range(3)]
        await asyncio.wait_for(handler.arrived.wait(), 10)  # the three, as one batch call
        assert handler.calls == 2
        await channel.close(None)
        for fut in [first, *rest]:
            with pytest.raises(PeerUnavailable, match="the connection was closed during the call"):
                await asyncio.wait_for(fut, 5)


def test_reconnect_retires_the_old_channel_and_opens_one_for_many_callers() -> None:
    asyncio.run(_reconnect_retires_the_old_channel_and_opens_one_for_many_callers())


async def _reconnect_retires_the_old_channel_and_opens_one_for_many_callers() -> None:
    async with _silent() as silent:
        address, handler = silent
        pool = PeerPool(max_message_bytes=4 << 20)
        try:
            stale = pool.destination(address)
            old = pool._channels[address]
            pending = asyncio.ensure_future(
                call(_method(old), b"", timeout=1.5, peer=address, what=WHAT)
            )
            await asyncio.wait_for(handler.arrived.wait(), 10)
            fresh = pool.reconnect(address, stale=stale)
            assert fresh is not stale and pool._channels[address] is not old
            # a second migration that failed on the same stale stub gets the fresh one: no
            # second channel (which would retire the first one's fresh channel in turn)
            assert pool.reconnect(address, stale=stale) is fresh
            # the call in flight on the old channel runs to its own end (its deadline here),
            # not cancelled by the reconnect
            with pytest.raises(Timeout):
                await pending
        finally:
            await pool.close()
