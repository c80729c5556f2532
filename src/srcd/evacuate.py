"""srcd's MigrateMany: a host evacuation in one call (docs/ARCHITECTURE.md, "Host evacuation").

The client names the destination, the base flags, which domains (or all) and how many live
migrations may run at once; srcd moves each domain with one ordinary p2p migration
(srcd/p2p.py: its own job, journal record, recovery, checks and error texts, exactly as
``Migrate`` with the same flags) and streams back, as each ends, its result. The rules for
what moves and how are migctl evacuate's (common/evacuation.py), read here when each domain's
turn comes.

Running domains move live, at most ``parallel`` at once (the long ones go first). Inactive
ones move offline, up to ``OFFLINE_WINDOW`` at once whatever ``parallel`` says: each is a
few milliseconds of work, and in flight together they meet in srcd's per-destination batcher
(one PrepareBatch/FinishBatch round trip for many, srcd/batcher.py) and in the group commits
of both daemons (one flush for many definitions, outcomes and undefines).

An error that every later migration would meet too (the destination is this host, cannot be
reached, refuses us) stops the run: the domains not started yet end with it. The client may
ask for the same (``stop``, its first Ctrl-C) and to abort the running live migrations
(``abort_live``, its second). A client that goes away stops the run; the migrations under
way run to their end (as Migrate's do), so no destination is left reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import structlog
from vmmigrate.common.errors import (
    InvalidArgument,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    VmmigrateError,
    error_from_status,
    libvirt_text,
)
from vmmigrate.common.evacuation import (
    STARTED_HERE,
    STOPS_EVACUATION,
    Selection,
    domain_flags,
    stopped_by,
)
from vmmigrate.common.flags import MigrateFlag, check_api_flags, parse_flags
from vmmigrate.common.rpc import cancelled_by_others, item_status, status_code
from vmmigrate.srcd.context import SourceContext
from vmmigrate.srcd.domains import DomainAPI
from vmmigrate.srcd.jobs import SourceParams
from vmmigrate.srcd.p2p import P2PMigration, new_migration_id

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.evacuate")

# inactive domains in flight at once (srcd's batcher sends up to 64 per batch call; the
# host's max_outgoing caps it too)
OFFLINE_WINDOW = 64
MAX_PARALLEL = 1024  # live migrations at once, at most (a sanity bound on the request)

_SELECTIONS = {
    pb.SELECT_ALL: Selection.ALL,
    pb.SELECT_LIVE: Selection.LIVE,
    pb.SELECT_OFFLINE: Selection.OFFLINE,
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A domain to move: its name (for the report), its UUID (what the migration names: a
    domain defined anew under the same name meanwhile is not taken for it), and whether it
    ran when the run began (running ones go first)."""

    name: str
    uuid: str
    active: bool


@dataclasses.dataclass(frozen=True)
class Request:
    """MigrateManyStart, checked: a bad request is refused before anything moves."""

    dest_uri: str
    flags: MigrateFlag
    params: SourceParams
    selection: Selection
    domains: tuple[str, ...]
    parallel: int

    @classmethod
    def from_pb(cls, start: pb.MigrateManyStart) -> Request:
        if not start.dest_uri:
            raise InvalidArgument("missing destination URI")
        selection = _SELECTIONS.get(start.selection)
        if selection is None:
            raise InvalidArgument(f"unknown evacuation selection {start.selection}")
        if not 1 <= start.parallel <= MAX_PARALLEL:
            raise InvalidArgument("evacuate: Invalid parallel count")
        flags = parse_flags(start.flags, "migrate")
        check_api_flags(flags | MigrateFlag.PEER2PEER)
        if flags & (MigrateFlag.LIVE | MigrateFlag.OFFLINE):
            raise InvalidArgument("MigrateMany chooses live or offline per domain itself")
        if any(not d for d in start.domains):
            raise InvalidArgument("missing domain name")
        return cls(
            dest_uri=start.dest_uri,
            flags=flags | MigrateFlag.PEER2PEER,
            params=SourceParams.from_pb(start.params),
            selection=selection,
            domains=tuple(dict.fromkeys(start.domains)),
            parallel=start.parallel,
        )


class _Units:
    """A counting semaphore whose takers ask for several units (one taker at a time)."""

    def __init__(self, units: int) -> None:
        self.free = units
        self._given = asyncio.Event()

    async def take(self, n: int) -> None:
        while self.free < n:
            self._given.clear()
            await self._given.wait()
        self.free -= n

    def give(self, n: int) -> None:
        self.free += n
        self._given.set()


class Evacuation:
    """One MigrateMany call's run: its targets, its workers, and the results it streams."""

    def __init__(self, ctx: SourceContext, request: Request) -> None:
        self.ctx = ctx
        self.api = DomainAPI(ctx)
        self.request = request
        self.stopped: VmmigrateError | None = None  # why no new migration starts
        self.live: set[str] = set()  # UUIDs of the live migrations running
        self._results: list[pb.MigrateManyResult] = []
        self._started = 0
        self._started_live = 0
        self._changed = asyncio.Event()
        self._done = False

    async def targets(self) -> tuple[list[Target], list[pb.MigrateManyResult]]:
        """The domains to move, running ones first, then by name; and the named ones that
        do not exist, with their NoDomain text (each domain once, however often named)."""
        found: list[Target] = []
        missing: list[pb.MigrateManyResult] = []
        if not self.request.domains:
            for e in await self.api.list(True):
                active = e.state != pb.DOMAIN_STATE_SHUTOFF
                found.append(Target(e.domain.name, e.domain.uuid, active))
        for key in self.request.domains:
            try:
                d, _ = self.ctx.lookup(key)
            except NoDomain as exc:
                missing.append(pb.MigrateManyResult(domain=key, error=item_status(exc)))
                continue
            active = self.ctx.is_active(d) and (
                await self.api.state_of(d) != pb.DOMAIN_STATE_SHUTOFF
            )
            found.append(Target(d.name, d.uuid, active))
        unique = {t.uuid: t for t in reversed(found)}  # the first naming wins
        return sorted(unique.values(), key=lambda t: (not t.active, t.name)), missing

    def stop(self, reason: VmmigrateError) -> None:
        if self.stopped is None:
            self.stopped = reason

    def abort_live(self) -> None:
        """The running live migrations are aborted (as domjobabort)."""
        for u in list(self.live):
            job = self.ctx.jobs.for_domain(u)
            if job is not None and not job.offline:
                job.abort_requested = True
                log.info("abort_requested", migration_id=job.migration_id, evacuation=True)

    def _report(self, result: pb.MigrateManyResult) -> None:
        self._results.append(result)
        self._changed.set()

    async def run(self, targets: list[Target]) -> None:
        """Every target to its end, in the order given: a live migration takes one of the
        ``parallel`` slots, an offline one 1/K of a slot (K = OFFLINE_WINDOW // parallel,
        at least 1), so that up to OFFLINE_WINDOW inactive domains are in flight together
        (their calls batched) while ``parallel`` still bounds the live ones."""
        share = max(1, OFFLINE_WINDOW // self.request.parallel)
        units = _Units(self.request.parallel * share)
        tasks: list[asyncio.Future[None]] = []
        try:
            for t in targets:
                cost = share if t.active else 1
                await units.take(cost)
                task = asyncio.ensure_future(self._move(t))
                task.add_done_callback(lambda _, c=cost: units.give(c))  # type: ignore[misc]
                tasks.append(task)
            await asyncio.gather(*tasks)
        finally:
            self._done = True
            self._changed.set()

    async def _move(self, target: Target) -> None:
        if self.stopped is not None:
            self._report(pb.MigrateManyResult(domain=target.name, error=item_status(self.stopped)))
            return
        self._started += 1
        self._changed.set()
        result = await self._migrate(target)
        self._report(result)
        if result.HasField("error"):
            st = result.error
            exc = error_from_status(status_code(st.code), st.message, st.error_class or None)
            if isinstance(exc, STOPS_EVACUATION):
                self.stop(OperationAborted(stopped_by(libvirt_text(exc))))

    async def _migrate(self, target: Target) -> pb.MigrateManyResult:
        """One domain: its state now, then one p2p migration; every error is its result."""
        kind = ""
        mid = new_migration_id()
        try:
            d, persistent = self.ctx.lookup(target.uuid)
            active = self.ctx.is_active(d) and (
                await self.api.state_of(d) != pb.DOMAIN_STATE_SHUTOFF
            )
            req = self.request
            flags = domain_flags(req.selection, active, persistent, req.flags)
            kind = "live" if active else "offline"
            migration = P2PMigration(
                self.ctx,
                migration_id=mid,
                domain_key=target.uuid,
                dest_uri=req.dest_uri,
                flags=flags,
                params=req.params if active else SourceParams.from_pb(pb.MigrationParams()),
            )
            if active:
                self.live.add(target.uuid)
                self._started_live += 1
                self._changed.set()
            try:
                # runs to its end even if the client goes away (as Migrate's)
                await asyncio.shield(self.ctx.keep(migration.run()))
            finally:
                self.live.discard(target.uuid)
            if MigrateFlag.UNDEFINE_SOURCE in flags and not active:
                self._check_gone(target)
        except VmmigrateError as exc:
            return pb.MigrateManyResult(
                domain=target.name, kind=kind, error=item_status(exc), migration_id=mid
            )
        except asyncio.CancelledError:
            if not cancelled_by_others():
                raise
            return self._broke(target, kind, mid, "cancelled")
        except Exception as exc:  # a bug: this domain's failure, never the whole stream's
            log.exception("evacuation_domain_failed", domain=target.name, migration_id=mid)
            return self._broke(target, kind, mid, repr(exc))
        return pb.MigrateManyResult(domain=target.name, kind=kind, migration_id=mid)

    @staticmethod
    def _broke(target: Target, kind: str, mid: str, what: str) -> pb.MigrateManyResult:
        error = OperationFailed(
            f"migration of domain '{target.name}' failed: internal error ({what})"
        )
        return pb.MigrateManyResult(
            domain=target.name, kind=kind, error=item_status(error), migration_id=mid
        )

    def _check_gone(self, target: Target) -> None:
        """After an offline migration with --undefinesource the definition is gone from
        here, unless the domain was started between our look and Begin: then Confirm kept
        it (a running source is never touched offline) and it is on both hosts."""
        with contextlib.suppress(NoDomain):
            self.ctx.lookup(target.uuid)
            raise OperationInvalid(STARTED_HERE)

    async def progress(
        self, first: pb.MigrateManyProgress
    ) -> AsyncIterator[pb.MigrateManyProgress]:
        """The stream: ``first``, then whatever started or ended since the last message
        (many results per message when they end together), until the run is over."""
        yield first
        while True:
            await self._changed.wait()
            self._changed.clear()
            results, self._results = self._results, []
            started, self._started = self._started, 0
            live, self._started_live = self._started_live, 0
            if results or started or live:
                yield pb.MigrateManyProgress(started=started, results=results, started_live=live)
            if self._done and not self._results:
                return


async def _follow(requests: AsyncIterator[pb.MigrateManyRequest], run: Evacuation) -> None:
    """The client's later messages: stop, abort_live (anything else is ignored)."""
    async for msg in requests:
        which = msg.WhichOneof("msg")
        if which == "stop":
            run.stop(OperationAborted("evacuation interrupted before this domain's turn"))
        elif which == "abort_live":
            run.abort_live()


async def migrate_many(
    ctx: SourceContext, requests: AsyncIterator[pb.MigrateManyRequest]
) -> AsyncIterator[pb.MigrateManyProgress]:
    """The MigrateMany stream (srcd/server.py turns its errors into a status)."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("msg") != "start":
        raise InvalidArgument("MigrateMany must begin with a start message")
    run = Evacuation(ctx, Request.from_pb(first.start))
    targets, missing = await run.targets()
    log.info(
        "evacuation_started",
        dest=run.request.dest_uri,
        domains=len(targets),
        missing=len(missing),
        parallel=run.request.parallel,
    )
    follower = asyncio.ensure_future(_follow(requests, run))
    # the run goes on if the client goes away: its migrations end, none new starts
    worker = ctx.spawn(run.run(targets))
    try:
        total = len(targets) + len(missing)
        async for msg in run.progress(pb.MigrateManyProgress(total=total, results=missing)):
            yield msg
        await worker
    finally:
        if not worker.done():
            run.stop(OperationAborted("evacuation interrupted: the client went away"))
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
    log.info("evacuation_ended", dest=run.request.dest_uri, domains=len(targets))
