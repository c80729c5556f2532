"""The destination side of the v3 sequence over gRPC (a client of dstd), and the phase
requests it sends: the same for srcd's peer-to-peer driver, srcd's recovery and migctl's
client-driven migration."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from vmmigrate.common.caps import check_destination
from vmmigrate.common.coordinator import Begun, Finished, Prepared
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.rpc import LOST_ANSWER_RETRY, Deadline, call, call_retrying, retry_busy

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

DEST = "destination host"


def phase_header(
    migration_id: str, flags: MigrateFlag, cookie: bytes = b"", deadline_unix_ms: int = 0
) -> pb.PhaseHeader:
    return pb.PhaseHeader(
        migration_id=migration_id,
        flags=int(flags),
        cookie=cookie,
        deadline_unix_ms=deadline_unix_ms,
    )


def finish_request(
    migration_id: str,
    flags: MigrateFlag,
    *,
    dest_name: str,
    cancelled: bool,
    cookie: bytes = b"",
    deadline_unix_ms: int = 0,
    params: pb.MigrationParams | None = None,
) -> pb.FinishRequest:
    """Finish, by migration id (idempotent at the destination)."""
    return pb.FinishRequest(
        header=phase_header(migration_id, flags, cookie, deadline_unix_ms),
        dest_name=dest_name,
        cancelled=cancelled,
        params=params,
    )


class DestinationCalls(Protocol):
    """dstd's phase calls: its stub (srcd), or srcd's relay of them (migctl, whose client
    certificate dstd refuses; migctl/managed.py)."""

    @property
    def GetCapabilities(self) -> Any: ...
    @property
    def Prepare(self) -> Any: ...
    @property
    def PrepareTunnel(self) -> Any: ...
    @property
    def Finish(self) -> Any: ...


class RemoteDestination:
    """A dstd, driven over gRPC. ``before`` runs before each phase call (named "prepare"
    or "finish"): srcd's failpoints."""

    def __init__(
        self,
        stub: pb_grpc.MigrationDestinationServiceStub | DestinationCalls,
        *,
        address: str,
        migration_id: str,
        deadline: Deadline,
        params: pb.MigrationParams,
        rpc_timeout: float,
        before: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.stub = stub
        self.address = address
        self.migration_id = migration_id
        self.deadline = deadline
        self.params = params
        self.rpc_timeout = rpc_timeout
        self.before = before
        self.dest_name = ""  # the name Finish asks for (--dname, else the source's)

    async def _before(self, phase: str) -> None:
        if self.before is not None:
            await self.before(phase)

    async def capabilities(self) -> pb.CapabilitiesResponse:
        caps: pb.CapabilitiesResponse = await call(
            self.stub.GetCapabilities,
            pb.CapabilitiesRequest(),
            timeout=self.deadline.rpc_timeout(self.rpc_timeout),
            peer=self.address,
            what=DEST,
        )
        return caps

    async def check(self, flags: MigrateFlag) -> None:
        caps = await self.capabilities()
        check_destination(caps.protocol_version, caps.offline, flags)

    def prepare_method(self, flags: MigrateFlag) -> Any:
        """The unary method Prepare goes through (srcd's p2p driver: its batcher)."""
        return self.stub.PrepareTunnel if MigrateFlag.TUNNELLED in flags else self.stub.Prepare

    def finish_method(self, flags: MigrateFlag) -> Any:
        """The unary method Finish goes through (srcd's p2p driver: its batcher)."""
        return self.stub.Finish

    async def prepare(self, begun: Begun, flags: MigrateFlag) -> Prepared:
        self.dest_name = self.params.dest_name or begun.domain_name
        await self._before("prepare")
        method = self.prepare_method(flags)
        request = pb.PrepareRequest(
            header=phase_header(self.migration_id, flags, begun.cookie, self.deadline.unix_ms),
            domain_xml=begun.domain_xml,
            params=self.params,
        )
        # Prepare is idempotent by migration id: a lost answer is asked for again (briefly:
        # a peer that stays away fails the migration); a busy destination is asked again
        # with backoff until the migration's deadline.
        response: pb.PrepareResponse = await retry_busy(
            lambda: call_retrying(
                method,
                request,
                timeout=self.deadline.rpc_timeout(self.rpc_timeout),
                peer=self.address,
                what=DEST,
                until=time.monotonic() + LOST_ANSWER_RETRY,
            ),
            self.deadline,
        )
        return Prepared(cookie=response.cookie, uri=response.uri)

    async def prepare_failed(self, exc: BaseException, flags: MigrateFlag) -> None:
        """Nothing to undo by default."""

    async def finish(self, flags: MigrateFlag, cookie: bytes, cancelled: bool) -> Finished:
        await self._before("finish")
        # Finish is idempotent by migration id: when the answer is lost (link down, peer
        # busy), ask again for a while instead of guessing its outcome; a cancelling
        # Finish gets a whole RPC timeout even past the migration's deadline (leaving the
        # peer reserved is worse).
        rpc_timeout = self.rpc_timeout
        response: pb.FinishResponse = await call_retrying(
            self.finish_method(flags),
            finish_request(
                self.migration_id,
                flags,
                dest_name=self.dest_name,
                cancelled=cancelled,
                cookie=cookie,
                deadline_unix_ms=self.deadline.unix_ms,
                params=self.params,
            ),
            timeout=rpc_timeout if cancelled else self.deadline.rpc_timeout(rpc_timeout),
            peer=self.address,
            what=DEST,
            until=time.monotonic() + rpc_timeout,
            while_active=True,
        )
        return Finished.from_pb(response)

    def finish_failed(self, flags: MigrateFlag) -> None:
        """Nothing to do by default (the destination's job ends at its deadline)."""
