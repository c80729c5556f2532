"""The migration protocol v3 sequence, once: Begin, Prepare, Perform, Finish, Confirm, with
libvirt's failure matrix (docs/ARCHITECTURE.md).

The coordinator knows no server and no transport: it drives a *source side* and a
*destination side* (the protocols below). Peer-to-peer, srcd drives a local source and a
destination over gRPC (srcd/p2p.py); client-driven, migctl drives both over gRPC
(migctl/managed.py). Where libvirt's two sequences differ, the source side says how:

    Begin -> Prepare          failure: the source job ends (abandon), no Finish, no Confirm
    after Prepare (a check)    failure: Finish(cancelled), then Confirm(cancelled)
    Perform (skipped offline)  failure: Finish(cancelled); Confirm(cancelled) unless the
                               source's Perform ended its job itself (change protection)
    Finish (always)            lost answer, not cancelled: the source side decides (settle
                               in the background, or leave the source paused) and its error
                               is reported, with no Confirm; any other failure is kept
    Confirm                    cancelled = Finish returned no domain; never raises

The first error is the one reported; with none, a Finish that returned no domain fails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Protocol

from vmmigrate.common.errors import OperationFailed, PeerUnavailable, Timeout, VmmigrateError
from vmmigrate.common.flags import SOURCE_ONLY, MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb


def destination_flags(flags: MigrateFlag) -> MigrateFlag:
    """What the destination's phases get: the source's flags without those only the source
    acts on, and without change protection (a source-side job rule)."""
    return flags & ~SOURCE_ONLY & ~MigrateFlag.CHANGE_PROTECTION


@dataclasses.dataclass(frozen=True)
class Begun:
    """Begin's result: what Prepare receives."""

    cookie: bytes
    domain_xml: str
    flags: MigrateFlag  # as Begin settled them (e.g. PAUSED for a paused domain)
    domain_name: str  # the name on the source

    @property
    def offline(self) -> bool:
        return MigrateFlag.OFFLINE in self.flags


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Prepare's result."""

    cookie: bytes
    uri: str  # where the stream goes ("" offline, and tunnelled)


@dataclasses.dataclass(frozen=True)
class Performed:
    """What Finish is called with after the Perform step."""

    cookie: bytes = b""
    cancelled: bool = False
    error: VmmigrateError | None = None
    confirm: bool = True  # False: the source's job ended already (no Confirm)


@dataclasses.dataclass(frozen=True)
class Finished:
    """Finish's result: a domain on the destination, or none (cancelled)."""

    domain: pb.DomainRef | None
    cookie: bytes = b""

    @classmethod
    def from_pb(cls, response: pb.FinishResponse) -> Finished:
        domain = response.domain if response.HasField("domain") else None
        return cls(domain, response.cookie)

    def to_pb(self) -> pb.FinishResponse:
        if self.domain is None:
            return pb.FinishResponse(cookie=self.cookie)
        return pb.FinishResponse(domain=self.domain, cookie=self.cookie)


AskFinish = Callable[[], Awaitable[Finished]]


class SourceSide(Protocol):
    # A failed Perform ends the source's job by itself (client-driven, with change
    # protection): Confirm is not called after it.
    perform_ends_job_on_failure: bool

    async def begin(self) -> Begun: ...

    async def abandon(self) -> None:
        """Prepare failed: end the source job (no Finish, no Confirm follow)."""

    async def after_prepare(self, prepared: Prepared) -> None:
        """Checks between Prepare and Perform; raising cancels the migration."""

    async def perform(self, prepared: Prepared) -> bytes:
        """The stream; returns the cookie for Finish."""

    def finish_unknown(self, exc: VmmigrateError, ask: AskFinish) -> VmmigrateError | None:
        """Finish's answer was lost (not cancelled): the error to report instead of
        confirming (the side settles or leaves the source as it must), or None to go on
        as for any failed Finish."""

    async def after_finish(self) -> None:
        """Between Finish and Confirm; raising is reported, Finish's answer still decides."""

    async def confirm(self, cancelled: bool, cookie: bytes) -> None:
        """Confirm; never raises (a failure is reported as a warning)."""


class DestinationSide(Protocol):
    async def check(self, flags: MigrateFlag) -> None:
        """Can it take this migration (its capabilities)?"""

    async def prepare(self, begun: Begun, flags: MigrateFlag) -> Prepared: ...

    async def prepare_failed(self, exc: BaseException, flags: MigrateFlag) -> None:
        """After a failed Prepare (and the source's abandon): whatever the side must undo."""

    async def finish(self, flags: MigrateFlag, cookie: bytes, cancelled: bool) -> Finished: ...

    def finish_failed(self, flags: MigrateFlag) -> None:
        """Finish failed (here or there): let go of the incoming job if it still holds."""


class Coordinator:
    """One migration's v3 sequence over a source side and a destination side."""

    def __init__(self, source: SourceSide, dest: DestinationSide, flags: MigrateFlag) -> None:
        self.source = source
        self.dest = dest
        self.flags = flags
        self.phases: list[str] = []  # the phases called, in order

    async def run(self) -> pb.DomainRef:
        """The sequence; returns the domain Finish returned, or raises the first error."""
        await self.dest.check(self.flags)
        begun = await self.source.begin()
        self.phases.append("begin")
        destflags = destination_flags(begun.flags)
        prepared = await self._prepare(begun, destflags)
        performed = await self._perform(begun, prepared)
        finished, error = await self._finish(destflags, performed)
        if performed.confirm:
            self.phases.append("confirm")
            # after Finish, "cancelled" means only: Finish returned no domain
            await self.source.confirm(finished.domain is None, finished.cookie)
        if error is not None:
            raise error
        if finished.domain is None:
            raise OperationFailed("migration failed: the destination did not return a domain")
        return finished.domain

    async def _prepare(self, begun: Begun, destflags: MigrateFlag) -> Prepared:
        self.phases.append("prepare")
        try:
            return await self.dest.prepare(begun, destflags)
        except BaseException as exc:
            await self.source.abandon()
            await self.dest.prepare_failed(exc, destflags)
            raise

    async def _perform(self, begun: Begun, prepared: Prepared) -> Performed:
        # Prepare succeeded there: from here on a failure goes through Finish(cancelled)
        try:
            await self.source.after_prepare(prepared)
        except VmmigrateError as exc:
            return Performed(cancelled=True, error=exc)
        if begun.offline:
            # Offline: Perform is skipped and Prepare's cookie is thrown away, so Finish
            # gets no cookie (libvirt does the same).
            return Performed()
        self.phases.append("perform")
        try:
            return Performed(cookie=await self.source.perform(prepared))
        except VmmigrateError as exc:
            return Performed(
                cancelled=True,
                error=exc,
                confirm=not self.source.perform_ends_job_on_failure,
            )

    async def _finish(
        self, destflags: MigrateFlag, performed: Performed
    ) -> tuple[Finished, VmmigrateError | None]:
        """Finish (always called): its result and the first error so far."""
        error = performed.error
        finished = Finished(None)
        self.phases.append("finish")
        try:
            finished = await self.dest.finish(destflags, performed.cookie, performed.cancelled)
        except (PeerUnavailable, Timeout) as exc:
            if not performed.cancelled:
                # Finish may have run there: guessing could run the domain twice (live)
                # or leave it defined on both hosts (offline, --undefinesource).
                lost = self.source.finish_unknown(
                    exc, lambda: self.dest.finish(destflags, performed.cookie, False)
                )
                if lost is not None:
                    raise lost from exc
            else:
                # the cancel got no answer (a cut link): keep asking in the background,
                # so the destination lets go of its emulator, created disks and
                # reservation when the link is back, not at its deadline
                self.dest.finish_failed(destflags)
            error = error or exc
        except VmmigrateError as exc:
            error = error or exc
            self.dest.finish_failed(destflags)
        try:
            await self.source.after_finish()
        except VmmigrateError as exc:
            error = error or exc  # reported; Finish's answer still decides
        return finished, error
