"""Client-driven ("managed") migration: migctl runs the v3 sequence itself.

libvirt's virDomainMigrateVersion3Full (PROTOCOL.md A.3), with change protection (the
source holds the job from Begin to Confirm):

    Begin (source) -> Prepare (destination)   failure: Confirm(cancelled) ends the source job
    Perform (source, skipped for offline)      failure: Finish(cancelled), no Confirm
    Finish (destination, always)               cancelled = Finish returned no domain
    Confirm (source)                           failure: reported as a warning only
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

from vmmigrate.common.caps import check_destination
from vmmigrate.common.errors import OperationFailed, PeerUnavailable, Timeout, VmmigrateError
from vmmigrate.common.flags import SOURCE_ONLY, MigrateFlag, check_api_flags
from vmmigrate.common.rpc import (
    LOST_ANSWER_RETRY,
    Deadline,
    call,
    call_retrying,
    open_channel,
    retry_busy,
)

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

SOURCE = "source host"
DEST = "destination host"
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
    channel = open_channel(dest_address)
    try:
        dest = pb_grpc.MigrationDestinationServiceStub(channel)
        return await _run(
            source=source,
            source_address=source_address,
            dest=dest,
            dest_address=dest_address,
            domain=domain,
            flags=flags,
            params=params,
            mid=mid,
            deadline=deadline,
        )
    finally:
        await channel.close(None)


async def _run(
    *,
    source: pb_grpc.MigrationSourceServiceStub,
    source_address: str,
    dest: pb_grpc.MigrationDestinationServiceStub,
    dest_address: str,
    domain: str,
    flags: MigrateFlag,
    params: pb.MigrationParams,
    mid: str,
    deadline: Deadline,
) -> pb.DomainRef:
    def header(f: MigrateFlag, cookie: bytes = b"") -> pb.PhaseHeader:
        return pb.PhaseHeader(
            migration_id=mid, flags=int(f), cookie=cookie, deadline_unix_ms=deadline.unix_ms
        )

    async def to_source(
        method: Any, request: Any, cleanup: bool = False, stream: bool = False
    ) -> Any:
        if stream:  # Perform: as long as the whole migration may take
            timeout = max(deadline.remaining(), 1.0)
        else:
            timeout = RPC_TIMEOUT if cleanup else deadline.rpc_timeout(RPC_TIMEOUT)
        return await call(method, request, timeout=timeout, peer=source_address, what=SOURCE)

    async def to_dest(method: Any, request: Any, cleanup: bool = False) -> Any:
        timeout = RPC_TIMEOUT if cleanup else deadline.rpc_timeout(RPC_TIMEOUT)
        return await call(method, request, timeout=timeout, peer=dest_address, what=DEST)

    caps: pb.CapabilitiesResponse = await to_dest(dest.GetCapabilities, pb.CapabilitiesRequest())
    check_destination(caps.protocol_version, caps.offline, flags)

    src_flags = flags | MigrateFlag.CHANGE_PROTECTION
    begun: pb.BeginResponse = await to_source(
        source.Begin,
        pb.BeginRequest(
            header=header(src_flags), domain=domain, params=params, dest_address=dest_address
        ),
    )
    src_flags = MigrateFlag(begun.flags) | MigrateFlag.CHANGE_PROTECTION
    destflags = MigrateFlag(begun.flags) & ~SOURCE_ONLY & ~MigrateFlag.CHANGE_PROTECTION
    source_name = begun.domain_name

    async def confirm(cancelled: bool, cookie: bytes) -> None:
        try:
            # idempotent by migration id: a lost answer is asked for again
            await call_retrying(
                source.Confirm,
                pb.ConfirmRequest(
                    header=header(src_flags, cookie), domain=domain, cancelled=cancelled
                ),
                timeout=RPC_TIMEOUT,
                peer=source_address,
                what=SOURCE,
                until=time.monotonic() + LOST_ANSWER_RETRY,
            )
        except VmmigrateError as exc:
            print(f"warning: Confirm on the source failed: {exc}", file=sys.stderr)

    try:
        prepare_request = pb.PrepareRequest(
            header=header(destflags, begun.cookie), domain_xml=begun.domain_xml, params=params
        )
        # idempotent by migration id: asked again if the answer is lost, and with backoff
        # while the destination is busy (its host limit), until the deadline
        prepared: pb.PrepareResponse = await retry_busy(
            lambda: call_retrying(
                dest.Prepare,
                prepare_request,
                timeout=deadline.rpc_timeout(RPC_TIMEOUT),
                peer=dest_address,
                what=DEST,
                until=time.monotonic() + LOST_ANSWER_RETRY,
            ),
            deadline,
        )
    except BaseException:
        # With change protection, Confirm(cancelled) just ends the source's job.
        await confirm(True, b"")
        raise

    first_error: VmmigrateError | None = None
    notify_source = True
    if not prepared.uri and MigrateFlag.OFFLINE not in flags:
        # libvirt makes this check before the offline shortcut in managed mode
        first_error = OperationFailed("domainMigratePrepare3 did not set uri")
        perform_cookie, cancelled = b"", True
    elif MigrateFlag.OFFLINE in flags:
        perform_cookie, cancelled = b"", False  # Perform skipped, Prepare's cookie dropped
    else:
        perform_params = pb.MigrationParams()
        perform_params.CopyFrom(params)
        perform_params.migrate_uri = prepared.uri
        try:
            performed: pb.PerformResponse = await to_source(
                source.Perform,
                pb.PerformRequest(
                    header=header(src_flags, prepared.cookie),
                    domain=domain,
                    params=perform_params,
                ),
                stream=True,
            )
            perform_cookie, cancelled = performed.cookie, False
        except VmmigrateError as exc:
            # the source's Perform restored the domain and ended its job: no Confirm
            first_error, perform_cookie, cancelled = exc, b"", True
            notify_source = False

    dest_domain: pb.DomainRef | None = None
    finish_cookie = b""
    try:
        # Finish is idempotent by migration id: a lost answer is asked for again.
        finished: pb.FinishResponse = await call_retrying(
            dest.Finish,
            pb.FinishRequest(
                header=header(destflags, perform_cookie),
                dest_name=params.dest_name or source_name,
                cancelled=cancelled,
                params=params,
            ),
            timeout=RPC_TIMEOUT if cancelled else deadline.rpc_timeout(RPC_TIMEOUT),
            peer=dest_address,
            what=DEST,
            until=time.monotonic() + RPC_TIMEOUT,
            while_active=True,
        )
        if finished.HasField("domain"):
            dest_domain = finished.domain
        finish_cookie = finished.cookie
    except (PeerUnavailable, Timeout) as exc:
        if MigrateFlag.OFFLINE not in flags and not cancelled:
            # The destination may be running the domain: no Confirm(cancelled), which would
            # resume it here too. The source's parked job ends by itself later.
            raise OperationFailed(
                f"Lost connection to destination host during Finish ({exc}): domain "
                f"'{source_name}' is left paused on the source, as the destination may be "
                "running it; check it there before resuming it here"
            ) from exc
        first_error = first_error or exc
    except VmmigrateError as exc:
        first_error = first_error or exc
    if notify_source:
        await confirm(dest_domain is None, finish_cookie)
    if first_error is not None:
        raise first_error
    if dest_domain is None:
        raise OperationFailed("migration failed: the destination did not return a domain")
    return dest_domain
