"""The peer-to-peer driver: srcd runs the whole v3 sequence itself.

It reads like libvirt's failure matrix (PROTOCOL.md A.2):

    begin (local)  -> prepare (destination)   failure: job ends, no Finish, no Confirm
    perform (local, skipped for offline)       failure: cancelled = True, error kept
    finish (destination, always)               cancelled = Finish returned no domain
    confirm (local, always)                    failure: logged, never hides the first error

The first error is the one reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import structlog
from vmmigrate.common.caps import check_destination
from vmmigrate.common.errors import OperationFailed, PeerUnavailable, Timeout, VmmigrateError
from vmmigrate.common.flags import SOURCE_ONLY, MigrateFlag
from vmmigrate.common.phase import Phase
from vmmigrate.common.rpc import LOST_ANSWER_RETRY, Deadline, call, call_retrying, retry_busy
from vmmigrate.srcd import phases
from vmmigrate.srcd.context import SourceContext
from vmmigrate.srcd.jobs import SourceJob, SourceParams
from vmmigrate.srcd.perform import perform_live
from vmmigrate.srcd.tunnel import SourceTunnel

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.p2p")

DEST = "destination host"


@dataclasses.dataclass(frozen=True)
class P2PResult:
    migration_id: str
    dest_domain: pb.DomainRef | None
    phases: tuple[str, ...]


def new_migration_id() -> str:
    return str(uuid.uuid4())


class P2PMigration:
    """One p2p migration. Each method is one step of the sequence; run() is the sequence."""

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
        self.ctx = ctx
        self.migration_id = migration_id
        self.domain_key = domain_key
        self.dest_uri = dest_uri
        self.flags = flags | MigrateFlag.PEER2PEER
        # p2p is already one job: libvirt clears CHANGE_PROTECTION here.
        self.flags &= ~MigrateFlag.CHANGE_PROTECTION
        self.params = params
        self.deadline = Deadline(ctx.config.migration_timeout)
        self.dest = ctx.peers.destination(dest_uri)
        self.phases: list[str] = []
        self.dest_features: frozenset[str] = frozenset()

    def _header(self, flags: MigrateFlag, cookie: bytes) -> pb.PhaseHeader:
        return pb.PhaseHeader(
            migration_id=self.migration_id,
            flags=int(flags),
            cookie=cookie,
            deadline_unix_ms=self.deadline.unix_ms,
        )

    def _rpc_timeout(self, cleanup: bool = False) -> float:
        """Per-RPC deadline. Cleanup calls (Finish cancelled) still get a full RPC timeout
        after the migration's deadline passed: leaving the peer reserved is worse."""
        cap = self.ctx.config.rpc_timeout
        return cap if cleanup else self.deadline.rpc_timeout(cap)

    async def check_destination(self) -> None:
        """The first call of a migration. A cached channel that failed earlier (the peer was
        down or cut off) fails fast until its reconnect backoff ends, with a stale error:
        on UNAVAILABLE, try once more on a fresh channel, as libvirt opens a new connection
        for every migration."""
        cached = self.ctx.peers.cached_caps(self.dest_uri)
        if cached is not None:
            check_destination(cached.protocol_version, cached.offline, self.flags)
            self.dest_features = frozenset(cached.features)
            return
        request = pb.CapabilitiesRequest()
        try:
            caps: pb.CapabilitiesResponse = await call(
                self.dest.GetCapabilities,
                request,
                timeout=self._rpc_timeout(),
                peer=self.dest_uri,
                what=DEST,
            )
        except PeerUnavailable:
            self.dest = await self.ctx.peers.reconnect(self.dest_uri)
            caps = await call(
                self.dest.GetCapabilities,
                request,
                timeout=self._rpc_timeout(),
                peer=self.dest_uri,
                what=DEST,
            )
        self.ctx.peers.remember_caps(self.dest_uri, caps)
        check_destination(caps.protocol_version, caps.offline, self.flags)
        self.dest_features = frozenset(caps.features)

    async def prepare(
        self, begin: phases.BeginResult, destflags: MigrateFlag
    ) -> pb.PrepareResponse:
        self.phases.append("prepare")
        await self.ctx.failpoints.hit("srcd.prepare.before")
        method = (
            self.dest.PrepareTunnel if MigrateFlag.TUNNELLED in destflags else self.dest.Prepare
        )
        request = pb.PrepareRequest(
            header=self._header(destflags, begin.cookie),
            domain_xml=begin.domain_xml,
            params=self.params.to_pb(),
        )
        # Prepare is idempotent by migration id: a lost answer is asked for again (briefly:
        # a peer that stays away fails the migration); a busy destination is asked again
        # with backoff until the migration's deadline.
        response: pb.PrepareResponse = await retry_busy(
            lambda: call_retrying(
                method,
                request,
                timeout=self._rpc_timeout(),
                peer=self.dest_uri,
                what=DEST,
                until=time.monotonic() + LOST_ANSWER_RETRY,
            ),
            self.deadline,
        )
        return response

    async def finish(
        self, job: SourceJob, destflags: MigrateFlag, cookie: bytes, cancelled: bool
    ) -> pb.FinishResponse:
        self.phases.append("finish")
        await self.ctx.failpoints.hit("srcd.finish.before")
        # Finish is idempotent by migration id: when the answer is lost (link down, peer
        # busy), ask again for a while instead of guessing its outcome.
        rpc_timeout = self.ctx.config.rpc_timeout
        response: pb.FinishResponse = await call_retrying(
            self.dest.Finish,
            pb.FinishRequest(
                header=self._header(destflags, cookie),
                dest_name=self.params.dest_name or job.domain.name,
                cancelled=cancelled,
                params=self.params.to_pb(),
            ),
            timeout=rpc_timeout if cancelled else self.deadline.rpc_timeout(rpc_timeout),
            peer=self.dest_uri,
            what=DEST,
            until=time.monotonic() + rpc_timeout,
            while_active=True,
        )
        return response

    def _cancel_remote_prepare(self, job: SourceJob, destflags: MigrateFlag) -> None:
        dest_name = self.params.dest_name or job.domain.name
        request = pb.FinishRequest(
            header=self._header(destflags, b""), dest_name=dest_name, cancelled=True
        )
        ctx, peer, mid = self.ctx, self.dest_uri, self.migration_id

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
            self.dest.GetCapabilities,
            pb.CapabilitiesRequest(),
            timeout=self.ctx.config.rpc_timeout,
            peer=self.dest_uri,
            what=DEST,
        )

    async def perform(self, job: SourceJob, prepared: pb.PrepareResponse) -> bytes:
        """Perform (local): the hypervisor stream, direct to the URI Prepare returned, or
        through the daemons' own connection when tunnelled."""
        self.phases.append("perform")
        if MigrateFlag.TUNNELLED not in self.flags:
            if not prepared.uri:
                raise OperationFailed("domainMigratePrepare3 did not set uri")
            return await perform_live(self.ctx, job, uri=prepared.uri, probe=self.probe)
        tunnel = SourceTunnel(
            self.ctx.peers.tunnel_bytes(self.dest_uri),
            self.dest_uri,
            self.migration_id,
            max(self.deadline.remaining(), 1.0),
        )
        uri = await tunnel.open()
        try:
            cookie = await perform_live(self.ctx, job, uri=uri, probe=self.probe)
            await tunnel.drain(self.ctx.config.rpc_timeout)
        except VmmigrateError:
            tunnel.check()  # a broken tunnel is the real cause
            raise
        finally:
            if tunnel.drained:  # every byte is at the destination: the stream ends by itself
                self.ctx.spawn(tunnel.linger(self.ctx.config.rpc_timeout))
            else:
                await tunnel.close()
        return cookie

    async def run(self) -> P2PResult:
        await self.check_destination()
        job, begun = await phases.begin(
            self.ctx,
            migration_id=self.migration_id,
            domain_key=self.domain_key,
            flags=self.flags,
            params=self.params,
            peer=self.dest_uri,
            deadline=self.deadline,
            driven=True,
        )
        self.phases.append("begin")
        destflags = begun.flags & ~SOURCE_ONLY
        try:
            prepared = await self.prepare(begun, destflags)
        except BaseException as exc:
            await phases.abandon(self.ctx, job)
            if isinstance(exc, (PeerUnavailable, Timeout)):
                # Did Prepare arrive? Unknown: it may still (a TCP retransmission after a
                # partition) and reserve the domain there. Cancel it blindly, in the
                # background, until the peer answers: Finish(cancelled) is idempotent and
                # leaves a tombstone that refuses a late Prepare.
                self._cancel_remote_prepare(job, destflags)
            if isinstance(exc, PeerUnavailable):
                # the next migration asks the peer afresh, on a fresh channel
                await self.ctx.peers.reconnect(self.dest_uri)
            raise

        first_error: VmmigrateError | None = None
        try:
            await self.ctx.failpoints.hit("srcd.prepare.after")
        except VmmigrateError as exc:
            # Prepare succeeded there: from here on a failure goes through Finish(cancelled)
            first_error = exc
        if first_error is not None:
            perform_cookie, cancelled = b"", True
        elif job.offline:
            # Offline: Perform is skipped and Prepare's cookie is thrown away, so Finish
            # gets no cookie (libvirt does the same).
            perform_cookie, cancelled = b"", False
        else:
            try:
                perform_cookie = await self.perform(job, prepared)
                cancelled = False
            except VmmigrateError as exc:
                first_error, perform_cookie, cancelled = exc, b"", True

        dest_domain: pb.DomainRef | None = None
        finish_cookie = b""
        try:
            finished = await self.finish(job, destflags, perform_cookie, cancelled)
            if finished.HasField("domain"):
                dest_domain = finished.domain
            finish_cookie = finished.cookie
        except (PeerUnavailable, Timeout) as exc:
            if not cancelled:
                # Finish may have run there: guessing could run the domain twice (live) or
                # leave it defined on both hosts (offline, --undefinesource). The job stays
                # held, a live domain paused, until the destination answers; and say so.
                phases.settle_later(
                    self.ctx, job, lambda: self.finish(job, destflags, perform_cookie, False)
                )
                if job.offline:
                    raise OperationFailed(
                        f"Lost connection to destination host during Finish ({exc}): whether "
                        f"domain '{job.domain.name}' is defined there is settled when the "
                        "destination answers (until then its definition stays here)"
                    ) from exc
                raise OperationFailed(
                    f"Lost connection to destination host during Finish ({exc}): domain "
                    f"'{job.domain.name}' stays paused here until the destination answers "
                    "whether it runs it (then it is stopped here, or resumed)"
                ) from exc
            first_error = first_error or exc
        except VmmigrateError as exc:
            first_error = first_error or exc
            # Finish failed (here or there): make sure the destination lets go of the
            # incoming job now rather than at its deadline (idempotent: a Finish that
            # answered already keeps its answer)
            self._cancel_remote_prepare(job, destflags)
        try:
            await self.ctx.failpoints.hit("srcd.finish.after")
        except VmmigrateError as exc:
            first_error = first_error or exc  # reported; Finish's answer still decides
        # After Finish, "cancelled" means only: Finish returned no domain.
        cancelled = dest_domain is None

        self.phases.append("confirm")
        try:
            await phases.confirm(self.ctx, job, cancelled=cancelled, cookie=finish_cookie)
        except VmmigrateError as exc:
            # libvirt: "Guest probably left in 'paused' state on source"; never hides the
            # real error, and a migration whose Finish returned a domain has succeeded.
            log.warning(
                "confirm_failed",
                migration_id=self.migration_id,
                error=str(exc),
                cancelled=cancelled,
            )
        if first_error is not None:
            raise first_error
        if dest_domain is None:
            raise OperationFailed("migration failed: the destination did not return a domain")
        log.info(
            "migration_completed",
            migration_id=self.migration_id,
            domain=job.domain.name,
            dest=self.dest_uri,
            phases=self.phases,
            final_phase=Phase.CONFIRM3.label,
        )
        return P2PResult(self.migration_id, dest_domain, tuple(self.phases))
