"""``migctl evacuate`` through srcd's MigrateMany stream (srcd/evacuate.py): one call for the
whole evacuation. srcd reads each domain's state when its turn comes, runs its p2p migration
and streams its result; this side prints the same progress and summary as the per-domain
path (migctl/evacuate.py), which remains for a srcd without MigrateMany (UNIMPLEMENTED).

Ctrl-C: the first asks srcd to start no new migration (``stop``), the second to abort the
running live ones (``abort_live``); the summary is printed either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
from typing import Any

import grpc
import grpc.aio
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.rpc import status_code, translate, translate_status

from vmmigrate.v1 import vmmigrate_pb2 as pb

DAEMON = "daemon"  # as migctl/main.py names srcd in its errors


class Unimplemented(Exception):
    """srcd has no MigrateMany (an older daemon): use one Migrate per domain."""


def outcome_error(status: pb.ItemStatus, peer: str) -> VmmigrateError:
    """A domain's error as migctl would have got it from its own Migrate call."""
    code = status_code(status.code)
    return translate_status(code, status.message, status.error_class or None, peer, DAEMON)


class StreamEvacuation:
    """The client end of one MigrateMany call."""

    def __init__(self, s: Any, start: pb.MigrateManyStart, deadline: float) -> None:
        self.s = s  # main's session: .dom (DomainService stub), .address
        self.start = start
        self.deadline = deadline
        self.interrupts = 0
        self.live = 0  # live migrations running
        self._call: Any = None
        self._writes: list[asyncio.Task[None]] = []

    async def run(self, progress: Any, outcome: Any, expected: list[str]) -> list[Any]:
        """Stream the evacuation; ``outcome(name, kind, error)`` builds an Outcome;
        ``expected``: the names srcd should report, so that a broken stream still reports
        each of them (with the error that broke it)."""
        self._call = self.s.dom.MigrateMany(timeout=self.deadline)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, lambda: self.interrupt(progress))
        outcomes: list[Any] = []
        try:
            await self._call.write(pb.MigrateManyRequest(start=self.start))
            async for msg in self._call:
                self._show(msg, progress, outcome, outcomes)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED and not outcomes:
                raise Unimplemented from None
            error = translate(err, self.s.address, DAEMON)
            if not outcomes and not expected:
                raise error from None
            reported = {o.name for o in outcomes}
            for name in expected:
                if name not in reported:
                    lost = outcome(name, "", error)
                    outcomes.append(lost)
                    progress.ended(lost, False)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            self._call.cancel()
            for task in self._writes:
                task.cancel()
        return outcomes

    def _show(
        self, msg: pb.MigrateManyProgress, progress: Any, outcome: Any, out: list[Any]
    ) -> None:
        if msg.total:
            progress.total = msg.total
        for _ in range(msg.started):
            progress.started()
        self.live += msg.started_live
        for r in msg.results:
            error = outcome_error(r.error, self.s.address) if r.HasField("error") else None
            o = outcome(r.domain, r.kind, error)
            out.append(o)
            self.live -= r.kind == "live" and bool(r.migration_id)
            # a domain whose migration started has a migration id
            progress.ended(o, bool(r.migration_id))

    def interrupt(self, progress: Any) -> None:
        """Ctrl-C: the first stops new migrations, the second aborts the live ones."""
        self.interrupts += 1
        if self.interrupts == 1:
            self._say(
                progress,
                f"migctl: interrupted: no new migration starts; waiting for the "
                f"{progress.running} running (Ctrl-C again aborts them)",
            )
            self._send(pb.MigrateManyRequest(stop=True))
        elif self.interrupts == 2:
            self._say(progress, f"migctl: aborting {self.live} live migration(s)")
            self._send(pb.MigrateManyRequest(abort_live=True))

    def _send(self, msg: pb.MigrateManyRequest) -> None:
        async def write() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.write(msg)

        self._writes.append(asyncio.ensure_future(write()))

    @staticmethod
    def _say(progress: Any, text: str) -> None:
        if progress.tty:
            sys.stdout.write("\n")
        print(text, file=sys.stderr, flush=True)


def stream_deadline(migrate_timeout: float, domains: int, parallel: int) -> float:
    """The whole call's deadline: one migration's per round of ``parallel`` (each domain's
    migration also has its own deadline, on srcd)."""
    return migrate_timeout * max(1, math.ceil(domains / max(parallel, 1)))
