"""Watching a running migration from the client: --verbose progress, Ctrl-C aborts.

The migration itself runs in one RPC (p2p Migrate, or the managed sequence); beside it this
module polls the source's job statistics for the progress line, and turns SIGINT into a
domjobabort so the migration ends cleanly (the source keeps running) instead of the client
vanishing half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable
from typing import Any, TextIO, TypeVar

from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.rpc import call

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

T = TypeVar("T")
POLL = 0.1
MIB = 1024 * 1024


class Progress:
    """The percentage shown never goes backwards, even when the guest dirties memory
    that was already sent and the remaining amount grows again."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.best = 0
        self.shown = False
        self._last: tuple[float, int] | None = None
        self._speed = 0.0

    def speed(self, info: pb.JobInfo) -> float:
        """Bytes/s: the emulator's figure, else measured from what was processed."""
        if info.memory_bps:
            return float(info.memory_bps)
        now = time.monotonic()
        if self._last is not None and now > self._last[0] and info.data_processed > self._last[1]:
            self._speed = (info.data_processed - self._last[1]) / (now - self._last[0])
        self._last = (now, info.data_processed)
        return self._speed

    def percent(self, info: pb.JobInfo) -> int:
        if info.data_total:
            pct = 100 - (info.data_remaining * 100) // info.data_total
            self.best = max(self.best, min(int(pct), 99))
        return self.best

    def line(self, info: pb.JobInfo) -> str:
        pct = self.percent(info)
        return (
            f"Migration: [{pct:3d} %] {self.speed(info) / MIB:8.1f} MiB/s, "
            f"{info.data_remaining / MIB:8.1f} MiB remaining"
        )

    def show(self, info: pb.JobInfo) -> None:
        if info.type != "Unbounded":
            return
        self.out.write("\r" + self.line(info))
        self.out.flush()
        self.shown = True

    def done(self, ok: bool) -> None:
        if ok:
            self.out.write("\rMigration: [100 %]" + " " * 50 + "\n")
        elif self.shown:
            self.out.write("\n")
        self.out.flush()


async def watch(
    migration: Awaitable[T],
    *,
    domains: pb_grpc.DomainServiceStub,
    address: str,
    domain: str,
    verbose: bool,
    abortable: bool,
) -> T:
    """Run ``migration``; show progress with ``verbose``; Ctrl-C asks the source to abort."""
    task = asyncio.ensure_future(migration)
    loop = asyncio.get_running_loop()
    aborting = asyncio.Event()
    if abortable:
        loop.add_signal_handler(signal.SIGINT, aborting.set)
    progress = Progress(sys.stdout)

    async def rpc(method: Any, request: Any) -> Any:
        return await call(method, request, timeout=10, peer=address, what="daemon")

    try:
        abort_sent = False
        while not task.done():
            if aborting.is_set() and not abort_sent:
                abort_sent = True
                print("\nmigctl: aborting the migration", file=sys.stderr)
                with contextlib.suppress(VmmigrateError):
                    await rpc(domains.AbortJob, pb.AbortJobRequest(domain=domain))
            if verbose:
                with contextlib.suppress(VmmigrateError):
                    progress.show(await rpc(domains.GetJobInfo, pb.JobInfoRequest(domain=domain)))
            await asyncio.wait([task], timeout=POLL)
        result = task.result()
    except BaseException:
        if verbose:
            progress.done(False)
        raise
    finally:
        if abortable:
            loop.remove_signal_handler(signal.SIGINT)
        if not task.done():
            task.cancel()
    if verbose:
        progress.done(True)
    return result
