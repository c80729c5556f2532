"""Client-driven ("managed") migration: migctl runs the v3 sequence (common/coordinator.py)
itself, with both sides over gRPC.

libvirt's virDomainMigrateVersion3Full (docs/ARCHITECTURE.md), with change protection (the
source holds the job from Begin to Confirm):

    Prepare fails        Confirm(cancelled) ends the source job
    no URI from Prepare  (checked before the offline shortcut) Finish(cancelled), Confirm
    Perform fails        the source's Perform ended its job: Finish(cancelled), no Confirm
    Finish answer lost   live: no Confirm (the destination may run the domain), an error
                         that says so; offline: as any failed Finish
    Confirm fails        reported as a warning only
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

from vmmigrate.common.coordinator import AskFinish, Begun, Coordinator, Prepared
from vmmigrate.common.errors import OperationFailed, VmmigrateError
from vmmigrate.common.flags import MigrateFlag, check_api_flags
from vmmigrate.common.rpc import LOST_ANSWER_RETRY, Deadline, call, call_retrying
from vmmigrate.common.v3client import RemoteDestination, phase_header

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

SOURCE = "source host"
RPC_TIMEOUT = 30.0


async def migrate(
    *,
    source: pb_grpc.MigrationSourceServiceStub,
    source_address: str,
    dest_address: str,
    domain: str,
    flags: MigrateFlag,
    params: pb.MigrationParams,
    migration_id: str | None,
    deadline: Deadline,
) -> pb.DomainRef:
    check_api_flags(flags)
    mid = migration_id or str(uuid.uuid4())
    return await _run(
        source=source,
        source_address=source_address,
        dest=RelayedDestination(source, dest_address),
        dest_address=dest_address,
        domain=domain,
        flags=flags,
        params=params,
        mid=mid,
        deadline=deadline,
    )


class RelayedDestination:
    """dstd's phase calls, through the source's srcd (MigrationSourceService's Destination*
    RPCs): dstd accepts host certificates only, so migctl never calls it itself; srcd
    forwards each request unchanged with its host certificate and this call's deadline.
    One path, with TLS or without."""

    def __init__(self, source: pb_grpc.MigrationSourceServiceStub, dest_address: str) -> None:
        self._source: Any = source  # aio stubs: grpc's typing knows only sync calls
        self._address = dest_address

    async def GetCapabilities(  # dstd stub names
        self, request: pb.CapabilitiesRequest, *, timeout: float
    ) -> pb.CapabilitiesResponse:
        relayed = pb.RelayCapabilitiesRequest(dest_address=self._address, request=request)
        caps: pb.CapabilitiesResponse = await self._source.DestinationCapabilities(
            relayed, timeout=timeout
        )
        return caps

    async def Prepare(self, request: pb.PrepareRequest, *, timeout: float) -> pb.PrepareResponse:
        relayed = pb.RelayPrepareRequest(dest_address=self._address, request=request)
        prepared: pb.PrepareResponse = await self._source.DestinationPrepare(
            relayed, timeout=timeout
        )
        return prepared

    # srcd sends a Prepare whose flags say TUNNELLED as PrepareTunnel
    PrepareTunnel = Prepare

    async def Finish(self, request: pb.FinishRequest, *, timeout: float) -> pb.FinishResponse:
        relayed = pb.RelayFinishRequest(dest_address=self._address, request=request)
        finished: pb.FinishResponse = await self._source.DestinationFinish(relayed, timeout=timeout)
        return finished


class RemoteSource:
    """A srcd, driven over gRPC with change protection."""

    perform_ends_job_on_failure = True  # the source's Perform restored the domain itself

    def __init__(
        self,
        stub: pb_grpc.MigrationSourceServiceStub,
        *,
        address: str,
        domain: str,
        dest_address: str,
        flags: MigrateFlag,
        params: pb.MigrationParams,
        migration_id: str,
        deadline: Deadline,
    ) -> None:
        self.stub = stub
        self.address = address
        self.domain = domain
        self.dest_address = dest_address
        self.flags = flags | MigrateFlag.CHANGE_PROTECTION
        self.params = params
        self.migration_id = migration_id
        self.deadline = deadline
        self.name = domain  # the name on the source, once Begin said it

    def _header(self, cookie: bytes = b"") -> pb.PhaseHeader:
        return phase_header(self.migration_id, self.flags, cookie, self.deadline.unix_ms)

    async def _call(self, method: Any, request: Any, stream: bool = False) -> Any:
        # Perform (a stream) may take as long as the whole migration
        if stream:
            timeout = max(self.deadline.remaining(), 1.0)
        else:
            timeout = self.deadline.rpc_timeout(RPC_TIMEOUT)
        return await call(method, request, timeout=timeout, peer=self.address, what=SOURCE)

    async def begin(self) -> Begun:
        request = pb.BeginRequest(
            header=self._header(),
            domain=self.domain,
            params=self.params,
            dest_address=self.dest_address,
        )
        begun: pb.BeginResponse = await self._call(self.stub.Begin, request)
        flags = MigrateFlag(begun.flags)
        self.flags = flags | MigrateFlag.CHANGE_PROTECTION
        self.name = begun.domain_name
        return Begun(begun.cookie, begun.domain_xml, flags, begun.domain_name)

    async def abandon(self) -> None:
        # With change protection, Confirm(cancelled) just ends the source's job.
        await self.confirm(True, b"")

    async def after_prepare(self, prepared: Prepared) -> None:
        if not prepared.uri and MigrateFlag.OFFLINE not in self.flags:
            # libvirt makes this check before the offline shortcut in managed mode
            raise OperationFailed("domainMigratePrepare3 did not set uri")

    async def perform(self, prepared: Prepared) -> bytes:
        params = pb.MigrationParams()
        params.CopyFrom(self.params)
        params.migrate_uri = prepared.uri
        request = pb.PerformRequest(
            header=self._header(prepared.cookie), domain=self.domain, params=params
        )
        performed: pb.PerformResponse = await self._call(self.stub.Perform, request, stream=True)
        return performed.cookie

    def finish_unknown(self, exc: VmmigrateError, ask: AskFinish) -> VmmigrateError | None:
        if MigrateFlag.OFFLINE in self.flags:
            return None
        # The destination may be running the domain: no Confirm(cancelled), which would
        # resume it here too. The source's parked job ends by itself later.
        return OperationFailed(
            f"Lost connection to destination host during Finish ({exc}): domain "
            f"'{self.name}' is left paused on the source, as the destination may be "
            "running it; check it there before resuming it here"
        )

    async def after_finish(self) -> None:
        """Nothing runs between Finish and Confirm here."""

    async def confirm(self, cancelled: bool, cookie: bytes) -> None:
        try:
            # idempotent by migration id: a lost answer is asked for again
            await call_retrying(
                self.stub.Confirm,
                pb.ConfirmRequest(
                    header=self._header(cookie), domain=self.domain, cancelled=cancelled
                ),
                timeout=RPC_TIMEOUT,
                peer=self.address,
                what=SOURCE,
                until=time.monotonic() + LOST_ANSWER_RETRY,
            )
        except VmmigrateError as exc:
            print(f"warning: Confirm on the source failed: {exc}", file=sys.stderr)


async def _run(
    *,
    source: pb_grpc.MigrationSourceServiceStub,
    source_address: str,
    dest: RelayedDestination,
    dest_address: str,
    domain: str,
    flags: MigrateFlag,
    params: pb.MigrationParams,
    mid: str,
    deadline: Deadline,
) -> pb.DomainRef:
    src = RemoteSource(
        source,
        address=source_address,
        domain=domain,
        dest_address=dest_address,
        flags=flags,
        params=params,
        migration_id=mid,
        deadline=deadline,
    )
    destination = RemoteDestination(
        dest,
        address=dest_address,
        migration_id=mid,
        deadline=deadline,
        params=params,
        rpc_timeout=RPC_TIMEOUT,
    )
    return await Coordinator(src, destination, flags).run()
