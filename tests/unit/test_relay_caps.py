"""srcd's relay of a client-driven migration's capabilities call (srcd/relay.py): answered
from the capabilities srcd learnt in the last PeerPool.CAPS_TTL seconds, else asked."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from vmmigrate.srcd import relay
from vmmigrate.srcd.context import PeerPool

from vmmigrate.v1 import vmmigrate_pb2 as pb


class FakeDstd:
    def __init__(self) -> None:
        self.asked: list[float] = []

    async def GetCapabilities(self, request: pb.CapabilitiesRequest, *, timeout: float) -> Any:
        self.asked.append(timeout)
        return pb.CapabilitiesResponse(protocol_version=3, offline=True, hostname="b")


class Peers(PeerPool):
    def __init__(self, dstd: FakeDstd) -> None:
        super().__init__(1 << 20)
        self.dstd = dstd
        self.addresses: list[str] = []

    def destination(self, address: str) -> Any:
        self.addresses.append(address)
        return self.dstd


def relayed(address: str) -> pb.RelayCapabilitiesRequest:
    return pb.RelayCapabilitiesRequest(dest_address=address, request=pb.CapabilitiesRequest())


def test_capabilities_are_asked_once_per_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    dstd = FakeDstd()
    peers = Peers(dstd)
    ctx: Any = SimpleNamespace(peers=peers, config=SimpleNamespace(rpc_timeout=5.0))
    context = SimpleNamespace(time_remaining=lambda: 10.0)
    now = [1000.0]
    monkeypatch.setattr("vmmigrate.srcd.context.time.monotonic", lambda: now[0])

    async def ask(address: str) -> pb.CapabilitiesResponse:
        return await relay.capabilities(ctx, relayed(address), context)

    first = asyncio.run(ask("127.0.0.3:7302"))
    second = asyncio.run(ask("127.0.0.3"))  # the same dstd: the default port is filled in
    assert first.hostname == second.hostname == "b"
    assert len(dstd.asked) == 1 and dstd.asked[0] == pytest.approx(10.0 - relay.ANSWER_MARGIN)
    assert peers.addresses == ["127.0.0.3:7302"]
    now[0] += PeerPool.CAPS_TTL + 0.1  # stale: asked again
    asyncio.run(ask("127.0.0.3:7302"))
    assert len(dstd.asked) == 2


def test_a_missing_address_is_refused_before_anything_is_asked() -> None:
    dstd = FakeDstd()
    ctx: Any = SimpleNamespace(peers=Peers(dstd), config=SimpleNamespace(rpc_timeout=5.0))
    with pytest.raises(Exception, match="missing destination address"):
        asyncio.run(relay.capabilities(ctx, relayed(""), SimpleNamespace(time_remaining=lambda: 1)))
    assert dstd.asked == []
