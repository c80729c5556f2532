"""The peer-to-peer driver: srcd runs the whole v3 sequence itself (common/coordinator.py),
with a local source side (srcd/phases.py) and a destination side over gRPC.

Where p2p differs from a client-driven migration (libvirt's, docs/ARCHITECTURE.md):

    prepare fails       the job ends (abandon); a lost answer is cancelled blindly, later
    perform fails       Confirm(cancelled) still runs here (the job is this driver's)
    finish answer lost  the job stays held (a live domain paused) and is settled in the
                        background when the destination answers; the error says so
    finish fails        the destination is told to let go of the incoming job, later
    confirm fails       logged, never hides the first error
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import structlog
from vmmigrate.common.caps import check_destination
from vmmigrate.common.coordinator import AskFinish, Begun, Coordinator, Prepared
from vmmigrate.common.errors import OperationFailed, PeerUnavailable, Timeout, VmmigrateError
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.phase import Phase
from vmmigrate.common.rpc import Deadline, call
from vmmigrate.common.v3client import DEST, RemoteDestination, finish_request
from vmmigrate.srcd import phases
from vmmigrate.srcd.context import SourceContext
from vmmigrate.srcd.jobs import SourceJob, SourceParams
from vmmigrate.srcd.mirror import check_tunnelled_nbd, nbd_server
from vmmigrate.srcd.perform import perform_live
from vmmigrate.srcd.tunnel import NbdTunnel, SourceTunnel

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.p2p")


@dataclasses.dataclass(frozen=True)
class P2PResult:
    migration_id: str
    dest_domain: pb.DomainRef | None
    phases: tuple[str, ...]


def new_migration_id() -> str:
    return str(uuid.uuid4())


class P2PDestination(RemoteDestination):
    """dstd as srcd's p2p driver sees it: capabilities cached per peer, a fresh channel
    after the peer was unreachable, srcd's failpoints, and blind cancels of an incoming
    job in the background."""

    def __init__(
        self,
        ctx: SourceContext,
        *,
        dest_uri: str,
        migration_id: str,
        deadline: Deadline,
        params: SourceParams,
    ) -> None:
        super().__init__(
            ctx.peers.destination(dest_uri),
            address=dest_uri,
            migration_id=migration_id,
            deadline=deadline,
            params=params.to_pb(),
            rpc_timeout=ctx.config.rpc_timeout,
            before=lambda phase: ctx.failpoints.hit(f"srcd.{phase}.before"),
        )
        self.ctx = ctx

    async def check(self, flags: MigrateFlag) -> None:
        """The first call of a migration. A cached channel that failed earlier (the peer was
        down or cut off) fails fast until its reconnect backoff ends, with a stale error:
        on UNAVAILABLE, try once more on a fresh channel, as libvirt opens a new connection
        for every migration."""
        cached = self.ctx.peers.cached_caps(self.address)
        if cached is not None:
            check_destination(cached.protocol_version, cached.offline, flags)
            return
        try:
            caps = await self.capabilities()
        except PeerUnavailable:
            self.stub = self.ctx.peers.reconnect(self.address, stale=self.stub)
            caps = await self.capabilities()
        self.ctx.peers.remember_caps(self.address, caps)
        check_destination(caps.protocol_version, caps.offline, flags)

    def prepare_method(self, flags: MigrateFlag) -> Any:
        # offline: through the per-destination batcher, coalesced with the other offline
        # migrations to that dstd (a live Prepare or Finish can take long: never queued
        # behind, or in front of, another migration's)
        if MigrateFlag.OFFLINE in flags:
            return self.ctx.peers.batcher(self.address).prepare
        return super().prepare_method(flags)

    def finish_method(self, flags: MigrateFlag) -> Any:
        if MigrateFlag.OFFLINE in flags:
            return self.ctx.peers.batcher(self.address).finish
        return super().finish_method(flags)

    async def prepare_failed(self, exc: BaseException, flags: MigrateFlag) -> None:
        if isinstance(exc, (PeerUnavailable, Timeout)):
            # Did Prepare arrive? Unknown: it may still (a TCP retransmission after a
            # partition) and reserve the domain there. Cancel it blindly, in the
            # background, until the peer answers: Finish(cancelled) is idempotent and
            # leaves a tombstone that refuses a late Prepare.
            self.cancel_later(flags)
        if isinstance(exc, PeerUnavailable):
            # the next migration asks the peer afresh, on a fresh channel
            self.ctx.peers.reconnect(self.address, stale=self.stub)

    def finish_failed(self, flags: MigrateFlag) -> None:
        # Finish failed (here or there): make sure the destination lets go of the
        # incoming job now rather than at its deadline (idempotent: a Finish that
        # answered already keeps its answer)
        self.cancel_later(flags)

    def cancel_later(self, flags: MigrateFlag) -> None:
        request = finish_request(
            self.migration_id,
            flags,
            dest_name=self.dest_name,
            cancelled=True,
            deadline_unix_ms=self.deadline.unix_ms,
        )
        ctx, peer, mid = self.ctx, self.address, self.migration_id

        async def cancel() -> None:
            # gRPC keepalive closes a silent connection within ~15 s, so no Prepare can
            # arrive much later than that: a minute of asking is plenty.
            until = time.monotonic() + max(4 * ctx.config.rpc_timeout, 60.0)
            while time.monotonic() < until:
                try:
                    await call(
                        ctx.peers.destination(peer).Finish,
                        request,
                        timeout=ctx.config.rpc_timeout,
                        peer=peer,
                        what=DEST,
                    )
                    log.info("remote_prepare_cancelled", migration_id=mid)
                    return
                except (PeerUnavailable, Timeout):
                    await asyncio.sleep(1.0)
                except VmmigrateError as exc:
                    log.info("remote_prepare_cancel_refused", migration_id=mid, error=str(exc))
                    return

        ctx.spawn(cancel())

    async def probe(self) -> None:
        """Is the destination still there? (keepalive during Perform)"""
        await call(
            self.stub.GetCapabilities,
            pb.CapabilitiesRequest(),
            timeout=self.ctx.config.rpc_timeout,
            peer=self.address,
            what=DEST,
        )


@dataclasses.dataclass
class LocalSource:
    """This srcd's own source phases (srcd/phases.py), for the p2p driver."""

    perform_ends_job_on_failure = False  # the driver confirms (cancelled) itself

    ctx: SourceContext
    dest: P2PDestination
    domain_key: str
    flags: MigrateFlag
    params: SourceParams
    _job: SourceJob | None = None

    @property
    def job(self) -> SourceJob:
        if self._job is None:
            raise OperationFailed("no migration job: Begin has not run")
        return self._job

    async def begin(self) -> Begun:
        job, begun = await phases.begin(
            self.ctx,
            migration_id=self.dest.migration_id,
            domain_key=self.domain_key,
            flags=self.flags,
            params=self.params,
            peer=self.dest.address,
            deadline=self.dest.deadline,
            driven=True,
        )
        self._job = job
        return Begun(begun.cookie, begun.domain_xml, begun.flags, job.domain.name)

    async def abandon(self) -> None:
        await phases.abandon(self.ctx, self.job)

    async def after_prepare(self, prepared: Prepared) -> None:
        await self.ctx.failpoints.hit("srcd.prepare.after")

    async def perform(self, prepared: Prepared) -> bytes:
        """Perform (local): the hypervisor stream, direct to the URI Prepare returned, or
        through the daemons' own connection when tunnelled."""
        job, dest = self.job, self.dest
        if MigrateFlag.TUNNELLED in self.flags:
            return await self._perform_tunnelled(prepared)
        if not prepared.uri:
            raise OperationFailed("domainMigratePrepare3 did not set uri")
        # storage copy: the destination's NBD server, from Prepare's cookie
        nbd = nbd_server(self.ctx, job, prepared.cookie, prepared.uri) if job.copies else None
        return await perform_live(self.ctx, job, uri=prepared.uri, probe=dest.probe, nbd=nbd)

    def _tunnel(self) -> SourceTunnel:
        dest, hv = self.dest, self.ctx.hypervisor
        return SourceTunnel(
            self.ctx.peers.tunnel_bytes(dest.address),
            dest.address,
            dest.migration_id,
            max(dest.deadline.remaining(), 1.0),
            path=str(hv.socket_dir / f"{self.job.domain.uuid}.tunnel-out"),
            emulator_gid=hv.emulator_gid(),
        )

    def _nbd_tunnel(self, prepared: Prepared) -> NbdTunnel | None:
        """Tunnelled storage copy: the disks' NBD connections through the daemons too."""
        job, dest = self.job, self.dest
        if not job.copies:
            return None
        check_tunnelled_nbd(self.ctx, job, prepared.cookie)
        hv = self.ctx.hypervisor
        return NbdTunnel(
            self.ctx.peers.tunnel_bytes(dest.address),
            dest.address,
            dest.migration_id,
            max(dest.deadline.remaining(), 1.0),
            path=str(hv.socket_dir / f"{job.domain.uuid}.nbd-out"),
            emulator_gid=hv.emulator_gid(),
        )

    async def _perform_tunnelled(self, prepared: Prepared) -> bytes:
        """The stream through the daemons. Once the source emulator has written all of it,
        Finish is asked at once while the rest crosses (the guest is paused until it has):
        the destination resumes nothing before its incoming emulator reports the whole
        stream loaded, so waiting here for the last credit first would only add a round
        trip to the pause. The tunnel is kept open until every byte is handed over."""
        job, dest = self.job, self.dest
        disks = self._nbd_tunnel(prepared)
        tunnel = self._tunnel()
        uri = await tunnel.open()
        try:
            nbd = await disks.open() if disks is not None else None
            cookie = await perform_live(self.ctx, job, uri=uri, probe=dest.probe, nbd=nbd)
        except VmmigrateError:
            await tunnel.close()
            tunnel.check()  # a broken tunnel is the real cause
            if disks is not None:
                disks.check()
            raise
        except BaseException:
            await tunnel.close()
            raise
        finally:
            if disks is not None:  # the mirrors are over: their streams end with them
                await disks.close()
        self.ctx.spawn(self._drain(tunnel))
        return cookie

    async def _drain(self, tunnel: SourceTunnel) -> None:
        """Every byte to the destination, then let the stream end by itself (or close it)."""
        timeout = self.ctx.config.rpc_timeout
        try:
            await tunnel.drain(timeout)
        finally:
            if tunnel.drained:
                await tunnel.linger(timeout)
            else:
                await tunnel.close()

    def finish_unknown(self, exc: VmmigrateError, ask: AskFinish) -> VmmigrateError:
        """The job stays held, a live domain paused, until the destination answers (in
        the background); and say so."""
        job = self.job

        async def ask_pb() -> pb.FinishResponse:
            return (await ask()).to_pb()

        phases.settle_later(self.ctx, job, ask_pb)
        if job.offline:
            return OperationFailed(
                f"Lost connection to destination host during Finish ({exc}): whether "
                f"domain '{job.domain.name}' is defined there is settled when the "
                "destination answers (until then its definition stays here)"
            )
        return OperationFailed(
            f"Lost connection to destination host during Finish ({exc}): domain "
            f"'{job.domain.name}' stays paused here until the destination answers "
            "whether it runs it (then it is stopped here, or resumed)"
        )

    async def after_finish(self) -> None:
        await self.ctx.failpoints.hit("srcd.finish.after")

    async def confirm(self, cancelled: bool, cookie: bytes) -> None:
        try:
            await phases.confirm(self.ctx, self.job, cancelled=cancelled, cookie=cookie)
        except VmmigrateError as exc:
            # libvirt: "Guest probably left in 'paused' state on source"; never hides the
            # real error, and a migration whose Finish returned a domain has succeeded.
            log.warning(
                "confirm_failed",
                migration_id=self.dest.migration_id,
                error=str(exc),
                cancelled=cancelled,
            )


class P2PMigration:
    """One p2p migration: the v3 coordinator over this srcd's phases and the destination."""

    def __init__(
        self,
        ctx: SourceContext,
        *,
        migration_id: str,
        domain_key: str,
        dest_uri: str,
        flags: MigrateFlag,
        params: SourceParams,
    ) -> None:
        self.migration_id = migration_id
        flags |= MigrateFlag.PEER2PEER
        # p2p is already one job: libvirt clears CHANGE_PROTECTION here.
        flags &= ~MigrateFlag.CHANGE_PROTECTION
        dest = P2PDestination(
            ctx,
            dest_uri=dest_uri,
            migration_id=migration_id,
            deadline=Deadline(ctx.config.migration_timeout),
            params=params,
        )
        self.source = LocalSource(ctx, dest, domain_key=domain_key, flags=flags, params=params)
        self.coordinator = Coordinator(self.source, dest, flags)

    async def run(self) -> P2PResult:
        dest_domain = await self.coordinator.run()
        log.info(
            "migration_completed",
            migration_id=self.migration_id,
            domain=self.source.job.domain.name,
            dest=self.source.dest.address,
            phases=self.coordinator.phases,
            final_phase=Phase.CONFIRM3.label,
        )
        return P2PResult(self.migration_id, dest_domain, tuple(self.coordinator.phases))
