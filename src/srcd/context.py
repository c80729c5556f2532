"""What every srcd handler needs, built once at start and passed in (no globals)."""

from __future__ import annotations

import dataclasses

import grpc.aio

from common.config import DaemonConfig
from common.domainxml import DomainDef
from common.failpoints import Failpoints
from common.rpc import open_channel
from common.store import HostStore
from srcd.jobs import SourceJobTable
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc


class PeerPool:
    """One long-lived channel per destination address, so migrations reuse warm
    connections (gRPC reconnects by itself after a peer restarts)."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}

    def destination(self, address: str) -> pb_grpc.MigrationDestinationServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, max_message_bytes=self._max)
            self._channels[address] = channel
        return pb_grpc.MigrationDestinationServiceStub(channel)

    async def reconnect(self, address: str) -> pb_grpc.MigrationDestinationServiceStub:
        """Drop the channel to ``address`` and open a fresh one."""
        old = self._channels.pop(address, None)
        if old is not None:
            await old.close(None)
        return self.destination(address)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(None)


@dataclasses.dataclass
class SourceContext:
    config: DaemonConfig
    store: HostStore
    jobs: SourceJobTable
    peers: PeerPool
    failpoints: Failpoints

    def is_active(self, domain: DomainDef) -> bool:
        """Whether the domain runs on this host. vmmigrate has no emulator driver yet, so no
        domain can be started and every defined domain is inactive (shut off)."""
        return False
