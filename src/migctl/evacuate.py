"""``migctl evacuate``: move every domain (or the named ones) off the host migctl talks to.

libvirt has no such command; the behaviour is the one of Proxmox's ``pvenode migrateall``
and oVirt's maintenance mode (docs/ARCHITECTURE.md section 9):

- running (and paused) domains move live, inactive ones offline; ``--live`` moves only the
  running ones and ``--offline`` only the inactive ones (an offline migration of a running
  domain would copy its definition and leave it running here: defined on two hosts, which
  is not an evacuation), the others are reported as not moved, with the reason;
- the definitions move: a persistent domain is defined on the destination and undefined
  here (``--persistent --undefinesource``); a transient one stays transient;
- each domain is one ordinary peer-to-peer migration (``DomainService.Migrate``, what
  ``migrate --p2p`` sends), so the journal, recovery, the job lock and every check and error
  text of a single migration hold; at most ``--parallel`` run at once, running domains
  first (the long ones, so that the evacuation ends sooner);
- each domain's state is read again when its turn comes, and a domain that vanished or
  changed meanwhile is reported, not a crash;
- an error that every later migration would meet too (the destination is this host, cannot
  be reached, refuses our certificate) stops the evacuation: the domains not started yet
  are reported with it;
- Ctrl-C starts no new migration and lets the running ones finish; a second Ctrl-C aborts
  the running live ones (``AbortJob``, as ``domjobabort``); the summary is printed either
  way.

Progress: on a terminal one line, rewritten in place; otherwise one line per domain as it
ends. Then the summary: what moved, what did not and why. Exit status 1 when any domain did
not move, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from vmmigrate.common.errors import (
    NoDomain,
    OperationAborted,
    OperationInvalid,
    VmmigrateError,
    libvirt_text,
)
from vmmigrate.common.evacuation import (
    STARTED_HERE,
    STOPS_EVACUATION,
    Selection,
    stopped_by,
)
from vmmigrate.common.evacuation import domain_flags as shared_domain_flags
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.migctl import evacstream
from vmmigrate.migctl.rules import check_stream_options

from vmmigrate.v1 import vmmigrate_pb2 as pb

INACTIVE = pb.DOMAIN_STATE_SHUTOFF


class EvacuateUsageError(Exception):
    """A command line refused before any daemon is called (migctl prints it as a usage
    error)."""


@dataclass(frozen=True)
class Options:
    """What the command line says, checked: the base flags and parameters of every live
    migration of the evacuation (the offline ones drop what only a stream uses)."""

    selection: Selection
    flags: MigrateFlag
    params: pb.MigrationParams
    parallel: int


def options(a: argparse.Namespace) -> Options:
    """The command line's options, with migrate's rules (section 4) and the evacuation's."""
    if a.parallel < 1:
        raise EvacuateUsageError("evacuate: Invalid parallel count")
    # without --live or --offline the running domains move live: their --timeout holds
    check_stream_options(a, "evacuate", offline=a.offline, error=EvacuateUsageError)
    if a.offline and a.tunnelled:
        raise EvacuateUsageError("evacuate: tunnelled offline migration does not make sense")
    flags = MigrateFlag.PEER2PEER
    for option, flag in (
        ("tunnelled", MigrateFlag.TUNNELLED),
        ("auto_converge", MigrateFlag.AUTO_CONVERGE),
        ("unsafe", MigrateFlag.UNSAFE),
    ):
        if getattr(a, option):
            flags |= flag
    selection = Selection.LIVE if a.live else Selection.OFFLINE if a.offline else Selection.ALL
    params = pb.MigrationParams(
        bandwidth_mib=a.bandwidth or 0,
        timeout_s=a.timeout or 0,
        timeout_suspend=a.timeout_suspend or a.timeout is not None,  # as migrate: virsh's rule
    )
    return Options(selection, flags, params, a.parallel)


def domain_flags(
    selection: Selection, state: pb.DomainState.ValueType, persistent: bool, base: MigrateFlag
) -> MigrateFlag:
    """The flags of one domain's migration, from its state when its turn comes; raises
    OperationInvalid (the reason it is not moved) when the selection leaves it here."""
    return shared_domain_flags(selection, state != INACTIVE, persistent, base)


@dataclass(frozen=True)
class Outcome:
    """One domain's end: moved (``error`` None) as ``kind`` (live, offline), or not."""

    name: str
    kind: str = ""
    error: VmmigrateError | None = None

    @property
    def moved(self) -> bool:
        return self.error is None

    def line(self) -> str:
        if self.error is None:
            return f"{self.name}: moved ({self.kind})"
        return f"{self.name}: not moved: {libvirt_text(self.error)}"


def summary(outcomes: Iterable[Outcome], dest: str) -> list[str]:
    """What moved and what did not (and why), each list in name order."""
    moved = sorted((o for o in outcomes if o.moved), key=lambda o: o.name)
    failed = sorted((o for o in outcomes if not o.moved), key=lambda o: o.name)
    lines = [f"Evacuation to {dest}: {len(moved)} moved, {len(failed)} not moved"]
    if moved:
        lines.append(f"Moved ({len(moved)}):")
        lines += [f"  {o.name} ({o.kind})" for o in moved]
    if failed:
        lines.append(f"Not moved ({len(failed)}):")
        lines += [f"  {o.name}: {libvirt_text(o.error)}" for o in failed if o.error]
    return lines


def exit_status(outcomes: Iterable[Outcome]) -> int:
    """1 when any domain did not move, else 0 (also for an evacuation of nothing)."""
    return 0 if all(o.moved for o in outcomes) else 1


class Progress:
    """On a terminal one line rewritten in place; elsewhere one line per domain as it ends."""

    def __init__(self, out: TextIO, total: int, tty: bool) -> None:
        self.out = out
        self.total = total
        self.tty = tty
        self.moved = 0
        self.failed = 0
        self.running = 0

    def line(self) -> str:
        return (
            f"evacuate: {self.moved}/{self.total} moved, {self.failed} not moved, "
            f"{self.running} running"
        )

    def started(self) -> None:
        self.running += 1
        self._show()

    def ended(self, outcome: Outcome, was_running: bool) -> None:
        self.running -= was_running
        if outcome.moved:
            self.moved += 1
        else:
            self.failed += 1
        if self.tty:
            self._show()
        else:
            print(outcome.line(), file=self.out, flush=True)

    def _show(self) -> None:
        if self.tty:
            self.out.write("\r" + self.line() + "\033[K")
            self.out.flush()

    def close(self) -> None:
        """Leave the progress line above what comes next."""
        if self.tty:
            self._show()
            self.out.write("\n")
            self.out.flush()


@dataclass(frozen=True)
class Target:
    """A domain to move: its name (for the report) and its UUID (what the calls name, so
    that a domain defined anew under the same name meanwhile is not taken for it)."""

    name: str
    uuid: str


class Evacuation:
    """The run: workers that take the next domain, read its state, migrate it."""

    def __init__(self, s: Any, dest: str, opts: Options, migrate_timeout: float) -> None:
        self.s = s  # main's session: .dom (DomainService stub), .rpc(method, request, timeout)
        self.dest = dest
        self.opts = opts
        self.migrate_timeout = migrate_timeout
        self.queue: deque[Target] = deque()
        self.outcomes: list[Outcome] = []
        self.live: dict[str, str] = {}  # uuid -> name of the live migrations running
        self.stopped: VmmigrateError | None = None  # why no new migration starts
        self.interrupts = 0
        self.aborts: list[asyncio.Task[None]] = []
        self.progress = Progress(sys.stdout, 0, False)

    async def run(self, targets: list[Target], progress: Progress) -> list[Outcome]:
        self.queue.extend(targets)
        self.progress = progress
        workers = [
            asyncio.ensure_future(self._worker())
            for _ in range(min(self.opts.parallel, len(targets)))
        ]
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        try:
            await asyncio.gather(*workers)
            await asyncio.gather(*self.aborts)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            for task in (*workers, *self.aborts):
                task.cancel()
        return self.outcomes

    def interrupt(self) -> None:
        """Ctrl-C: the first stops new migrations, the second aborts the live ones."""
        self.interrupts += 1
        if self.interrupts == 1:
            self.stop(OperationAborted("evacuation interrupted before this domain's turn"))
            self._say(
                f"migctl: interrupted: no new migration starts; waiting for the "
                f"{self.progress.running} running (Ctrl-C again aborts them)"
            )
        elif self.interrupts == 2:
            self._say(f"migctl: aborting {len(self.live)} live migration(s)")
            self.aborts += [asyncio.ensure_future(self._abort(u)) for u in self.live]

    def stop(self, reason: VmmigrateError) -> None:
        """No new migration starts; those still queued end as not moved, with ``reason``."""
        if self.stopped is None:
            self.stopped = reason

    def _say(self, text: str) -> None:
        if self.progress.tty:
            sys.stdout.write("\n")
        print(text, file=sys.stderr, flush=True)

    async def _abort(self, uuid: str) -> None:
        # the migration may have ended meanwhile ("no job is active on the domain"): its
        # outcome is reported by its worker either way
        with contextlib.suppress(VmmigrateError):
            await self.s.rpc(self.s.dom.AbortJob, pb.AbortJobRequest(domain=uuid))

    async def _worker(self) -> None:
        while self.queue:
            target = self.queue.popleft()
            if self.stopped is not None:
                self._record(Outcome(target.name, error=self.stopped), False)
                continue
            self.progress.started()
            outcome = await self._move(target)
            self._record(outcome, True)
            if outcome.error is not None and isinstance(outcome.error, STOPS_EVACUATION):
                text = libvirt_text(outcome.error)
                self.stop(OperationAborted(stopped_by(text)))

    def _record(self, outcome: Outcome, was_running: bool) -> None:
        self.outcomes.append(outcome)
        self.progress.ended(outcome, was_running)

    async def _move(self, target: Target) -> Outcome:
        """One domain: its state now, then one p2p Migrate; every error is its outcome."""
        kind = ""
        try:
            info = await self.s.rpc(self.s.dom.GetInfo, pb.DomainRequest(domain=target.uuid))
            flags = domain_flags(self.opts.selection, info.state, info.persistent, self.opts.flags)
            live = MigrateFlag.LIVE in flags
            kind = "live" if live else "offline"
            request = pb.MigrateRequest(
                domain=target.uuid,
                dest_uri=self.dest,
                flags=int(flags),
                params=self.opts.params if live else pb.MigrationParams(),
            )
            if live:
                self.live[target.uuid] = target.name
            try:
                await self.s.rpc(self.s.dom.Migrate, request, timeout=self.migrate_timeout)
            finally:
                self.live.pop(target.uuid, None)
            if MigrateFlag.UNDEFINE_SOURCE in flags and not live:
                await self._check_gone(target)
        except VmmigrateError as exc:
            return Outcome(target.name, kind, exc)
        return Outcome(target.name, kind)

    async def _check_gone(self, target: Target) -> None:
        """After an offline migration with --undefinesource the domain is gone from here,
        unless it was started between our look and the migration's Begin: then Confirm
        kept it (a running source is never touched by an offline migration) and it is
        defined on both hosts; say so rather than count it moved."""
        try:
            await self.s.rpc(self.s.dom.GetInfo, pb.DomainRequest(domain=target.uuid))
        except NoDomain:
            return
        raise OperationInvalid(STARTED_HERE)


async def targets(s: Any, names: list[str] | None) -> tuple[list[Target], list[Outcome]]:
    """The domains to move, running ones first, and the named ones that do not exist
    (reported with srcd's own text). Each domain once, however often it is named."""
    entries: list[tuple[pb.DomainRef, bool]] = []
    missing: list[Outcome] = []
    if names is None:
        r = await s.rpc(s.dom.List, pb.ListRequest(all=True))
        entries = [(e.domain, e.state != INACTIVE) for e in r.domains]
    else:
        for name in dict.fromkeys(names):
            try:
                info = await s.rpc(s.dom.GetInfo, pb.DomainRequest(domain=name))
            except NoDomain as exc:
                missing.append(Outcome(name, error=exc))
                continue
            entries.append((info.domain, info.state != INACTIVE))
    seen: dict[str, tuple[Target, bool]] = {}
    for ref, active in entries:
        seen.setdefault(ref.uuid, (Target(ref.name, ref.uuid), active))
    ordered = sorted(seen.values(), key=lambda t: (not t[1], t[0].name))
    return [t for t, _ in ordered], missing


async def evacuate(
    a: argparse.Namespace, s: Any, dest: str, migrate_timeout: float, out: TextIO
) -> int:
    """The command: select, migrate, report. Returns the exit status. Through srcd's
    MigrateMany stream; one Migrate per domain if srcd has no MigrateMany."""
    opts = options(a)
    with contextlib.suppress(evacstream.Unimplemented):
        return await _by_stream(a, s, dest, opts, migrate_timeout=migrate_timeout, out=out)
    todo, missing = await targets(s, a.domains)
    progress = Progress(out, len(todo) + len(missing), out.isatty())
    for outcome in missing:
        progress.ended(outcome, False)
    outcomes = missing + await Evacuation(s, dest, opts, migrate_timeout).run(todo, progress)
    return _report(outcomes, dest, progress, out)


_SELECTIONS = {
    Selection.ALL: pb.SELECT_ALL,
    Selection.LIVE: pb.SELECT_LIVE,
    Selection.OFFLINE: pb.SELECT_OFFLINE,
}


async def _by_stream(
    a: argparse.Namespace, s: Any, dest: str, opts: Options, *, migrate_timeout: float, out: TextIO
) -> int:
    """The whole evacuation in one MigrateMany call (raises evacstream.Unimplemented)."""
    if a.domains is None:
        r = await s.rpc(s.dom.List, pb.ListRequest(all=True))
        expected = [e.domain.name for e in r.domains]
    else:
        expected = list(dict.fromkeys(a.domains))
    start = pb.MigrateManyStart(
        dest_uri=dest,
        flags=int(opts.flags),
        params=opts.params,
        selection=_SELECTIONS[opts.selection],
        domains=a.domains or [],
        parallel=opts.parallel,
    )
    progress = Progress(out, len(expected), out.isatty())
    deadline = evacstream.stream_deadline(migrate_timeout, len(expected), opts.parallel)
    run = evacstream.StreamEvacuation(s, start, deadline)
    outcomes = await run.run(progress, Outcome, expected)
    return _report(outcomes, dest, progress, out)


def _report(outcomes: list[Outcome], dest: str, progress: Progress, out: TextIO) -> int:
    progress.close()
    for line in summary(outcomes, dest):
        print(line, file=out)
    out.flush()
    status = exit_status(outcomes)
    if status:
        failed = sum(not o.moved for o in outcomes)
        print(f"error: Failed to evacuate {failed} of {len(outcomes)} domain(s)", file=sys.stderr)
    return status
