"""What every srcd handler needs, built once at start and passed in (no globals)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc.aio
from vmmigrate.common import tunnelwire
from vmmigrate.common.config import DaemonConfig
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import HostBusy
from vmmigrate.common.failpoints import Failpoints
from vmmigrate.common.groupcommit import GroupCommit, offloader
from vmmigrate.common.hypervisor import QMPHypervisor, RuntimeRecord
from vmmigrate.common.observe import Observability
from vmmigrate.common.rpc import open_channel
from vmmigrate.common.shutdown import ShutdownGate
from vmmigrate.common.store import HostStore, JobLock
from vmmigrate.common.tls import TlsFiles
from vmmigrate.srcd.batcher import DestinationBatcher
from vmmigrate.srcd.jobs import CompletedJob, SourceJobTable

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

T = TypeVar("T")

_Stub = tuple[grpc.aio.Channel, pb_grpc.MigrationDestinationServiceStub]


class PeerPool:
    """One long-lived channel per destination address, so migrations reuse warm
    connections (gRPC reconnects by itself after a peer restarts). With ``tls``, channels
    present this host's certificate; after a rotation (SIGHUP) new channels are opened
    with the new one, and the old ones close once their calls end."""

    # How long a destination's capabilities are trusted without asking again. libvirt asks
    # on every migration; back-to-back migrations to one host (an evacuation) need not.
    CAPS_TTL = 5.0

    # How long a channel replaced by a rotation may finish the calls it carries, seconds.
    RETIRE_GRACE = 3600.0

    def __init__(
        self,
        max_message_bytes: int,
        tls: TlsFiles | None = None,
        failpoints: Failpoints | None = None,
    ) -> None:
        self._failpoints = failpoints or Failpoints()
        self._max = max_message_bytes
        self._tls = tls
        self._generation = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._caps: dict[str, tuple[float, pb.CapabilitiesResponse]] = {}
        self._batchers: dict[str, DestinationBatcher] = {}
        self._stubs: dict[str, _Stub] = {}  # by address, with the channel it was built on

    def cached_caps(self, address: str) -> pb.CapabilitiesResponse | None:
        entry = self._caps.get(address)
        if entry is None or time.monotonic() - entry[0] > self.CAPS_TTL:
            return None
        return entry[1]

    def remember_caps(self, address: str, caps: pb.CapabilitiesResponse) -> None:
        self._caps[address] = (time.monotonic(), caps)

    def _rotated(self) -> None:
        """After a certificate rotation, retire every channel: the next call opens a new
        one with the new certificate; a migration in flight keeps its stream."""
        if self._tls is None:
            return
        self._tls.current()
        if self._tls.generation == self._generation:
            return
        self._generation = self._tls.generation
        channels, self._channels = self._channels, {}
        for old in channels.values():
            self._retire(old)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """Close ``channel`` once the calls it carries have ended (each has its deadline):
        closing it at once would cancel other migrations' calls in flight on it."""
        task = asyncio.ensure_future(channel.close(self.RETIRE_GRACE))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _channel(self, address: str) -> grpc.aio.Channel:
        self._rotated()
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, max_message_bytes=self._max, tls=self._tls)
            self._channels[address] = channel
        return channel

    def destination(self, address: str) -> pb_grpc.MigrationDestinationServiceStub:
        """The stub on ``address``'s channel (built once per channel: a stub makes one
        callable per method)."""
        channel = self._channel(address)
        stub = self._stubs.get(address)
        if stub is None or stub[0] is not channel:
            stub = (channel, pb_grpc.MigrationDestinationServiceStub(channel))
            self._stubs[address] = stub
        return stub[1]

    def batcher(self, address: str) -> DestinationBatcher:
        """The coalescing Prepare/Finish lanes to ``address`` (srcd/batcher.py), on the
        channel of the moment (a reconnect or a rotation is seen by the next batch)."""
        batcher = self._batchers.get(address)
        if batcher is None:
            batcher = DestinationBatcher(
                lambda: self.destination(address),
                peer=address,
                what="destination host",
                max_bytes=self._max // 2,
                answered=lambda phase: self._failpoints.hit(f"srcd.{phase}.batch_answered"),
            )
            self._batchers[address] = batcher
        return batcher

    def tunnel_bytes(self, address: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
        """The TunnelBytes stream to ``address``, on the same channel as the stub's calls;
        no serializers: messages are the bytes themselves (common/tunnelwire.py)."""
        return self._channel(address).stream_stream(
            tunnelwire.METHOD, request_serializer=None, response_deserializer=None
        )

    def reconnect(
        self, address: str, stale: object = None
    ) -> pb_grpc.MigrationDestinationServiceStub:
        """Open a fresh channel to ``address`` for the calls from now on (no reconnect
        backoff after a peer restart); the old one is retired, not closed under the calls
        other migrations have in flight on it. ``stale``: the stub the caller failed on;
        when another migration has replaced it already, its replacement is used (many
        migrations failing together open one new channel, not one each)."""
        current = self._stubs.get(address)
        if stale is not None and current is not None and current[1] is not stale:
            return self.destination(address)
        self._caps.pop(address, None)
        self._stubs.pop(address, None)
        old = self._channels.pop(address, None)
        if old is not None:
            self._retire(old)
        return self.destination(address)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        self._stubs.clear()
        for channel in channels.values():
            await channel.close(None)
        for task in list(self._retiring):
            task.cancel()


class OutgoingSlots:
    """The host limit on outgoing migrations (max_outgoing, 0 = none): a migration beyond
    it waits for a slot, in arrival order, until its deadline."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit) if limit else None

    async def acquire(self, wait: float) -> None:
        if self._sem is None:
            return
        try:
            await asyncio.wait_for(self._sem.acquire(), max(wait, 0.001))
        except TimeoutError:
            raise HostBusy(
                f"too many outgoing migrations on this host (max_outgoing {self.limit}): "
                f"no slot freed within {wait:.0f} s"
            ) from None

    def release(self) -> None:
        if self._sem is not None:
            self._sem.release()


class EndedJobs:
    """How recent jobs ended (migration id -> Confirm was cancelled), so that a retried
    Confirm gets the first answer."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._ended: collections.OrderedDict[str, bool] = collections.OrderedDict()

    def add(self, migration_id: str, cancelled: bool) -> None:
        self._ended[migration_id] = cancelled
        while len(self._ended) > self.LIMIT:
            self._ended.popitem(last=False)

    def get(self, migration_id: str) -> bool | None:
        return self._ended.get(migration_id)


@dataclasses.dataclass
class SourceContext:
    config: DaemonConfig
    store: HostStore
    jobs: SourceJobTable
    peers: PeerPool
    failpoints: Failpoints
    hypervisor: QMPHypervisor
    outgoing: OutgoingSlots
    obs: Observability  # metrics, events, history
    ended: EndedJobs = dataclasses.field(default_factory=EndedJobs)
    # migrate-setspeed / migrate-setmaxdowntime, per domain UUID (libvirt keeps the speed as
    # the domain's default for its next migration).
    max_speed_mib: dict[str, int] = dataclasses.field(default_factory=dict)
    max_downtime_ms: dict[str, int] = dataclasses.field(default_factory=dict)
    # The last finished migration job of each domain (domjobinfo --completed).
    completed_jobs: dict[str, CompletedJob] = dataclasses.field(default_factory=dict)
    # Tasks that outlive an RPC (settling a migration whose Finish answer was lost).
    background: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    kept: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    # Closed on SIGTERM: new migrations are refused while those in flight finish.
    gate: ShutdownGate = dataclasses.field(default_factory=ShutdownGate)
    # when housekeeping last removed unused job lock files (0: at its first tick)
    locks_swept: float = 0.0
    # group commit of Confirm's --undefinesource removals (common/groupcommit.py): those of
    # concurrent migrations share one directory flush
    undefines: GroupCommit[tuple[str, JobLock | None], DomainDef] = dataclasses.field(init=False)

    # the journal's non-durable writes and removals, off the event loop (groupcommit.py)
    offload: GroupCommit[Callable[[], Any], Any] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.undefines = GroupCommit(self.store.undefine_many, inline=self.alone)
        self.offload = offloader(inline=self.alone)

    def migrations_in_flight(self) -> int:
        """Jobs a graceful stop waits for: running or parked ones, and settling tasks."""
        return len(self.jobs) + len(self.background)

    def alone(self) -> bool:
        """At most one migration in flight: its small store writes need no thread hand-off
        (common/groupcommit.py, ``inline``)."""
        return self.migrations_in_flight() <= 1

    def keep(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """``work`` as a task kept referenced until it ends (a task only the event loop
        knows of may be collected while it waits): a migration an RPC shields so that it
        runs to its end if the client goes away. Counted as its job, not as background."""
        task = asyncio.ensure_future(work)
        self.kept.add(task)
        task.add_done_callback(self._kept_ended)
        return task

    def _kept_ended(self, task: asyncio.Task[Any]) -> None:
        self.kept.discard(task)
        if not task.cancelled():
            task.exception()  # seen: the migration logged its own end; its RPC may be gone

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in the background, beyond the RPC that started it (kept referenced
        until it ends)."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def transient_domains(self, records: list[RuntimeRecord] | None = None) -> list[DomainDef]:
        """Running domains with no definition here (they arrived by a live migration
        without --persistent): their running XML is all there is. ``records``: the
        runtime records, if the caller has just read them."""
        return [
            parse_domain(rec.xml, generate_uuid=False, max_bytes=len(rec.xml.encode()) + 1)
            for rec in (self.hypervisor.records() if records is None else records)
            if rec.xml and self.store.find(rec.uuid) is None
        ]

    def lookup(self, key: str) -> tuple[DomainDef, bool]:
        """(definition, persistent): a persistent domain, else a transient running one.
        Cheap (cached store scans, small record files): called on the event loop."""
        d = self.store.find(key)
        if d is not None:
            return d, True
        for t in self.transient_domains():
            if key in (t.name, t.uuid):
                return t, False
        return self.store.lookup(key), True  # raises NoDomain

    def is_active(self, domain: DomainDef) -> bool:
        """Whether the domain runs on this host (a live emulator process)."""
        return self.hypervisor.record(domain.uuid) is not None
