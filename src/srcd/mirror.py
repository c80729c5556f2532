"""Storage copy, the source's Perform (docs/ARCHITECTURE.md section 14): libvirt's NBD
sequence (qemuMigrationSrcNBDStorageCopy and what follows it).

Before the memory: for each copied disk, an NBD client node to the destination's export
(``blockdev-add``) and a mirror job from the disk's format node into it
(``blockdev-mirror``: sync "full" for --copy-storage-all, "top" for --copy-storage-inc),
then a wait until every job is ready (source and copy in step). The memory then migrates
with QEMU's ``pause-before-switchover``: when the guest is paused and only the switch-over
is left, the mirrors are ended as libvirt ends them (``block-job-cancel`` of a ready job:
QEMU completes it with a point-in-time copy and leaves the source on its own disks), the
NBD nodes are removed, and the migration continues. Any failure: every mirror is
cancelled by force and its node removed; the source runs on, on its own disks.

Policy is pure (:func:`assess`: the mirrors' state from query-jobs, tested as a table);
:class:`Mirrors` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from vmmigrate.common.address import parse_hostport
from vmmigrate.common.cookie import ACCEPT_PERFORM, Nbd, parse_cookie
from vmmigrate.common.errors import OperationFailed, VmmigrateError
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.hypervisor import QMPHypervisor
from vmmigrate.common.qmp import QMPClient, QMPError
from vmmigrate.srcd.context import SourceContext
from vmmigrate.srcd.jobs import SourceJob
from vmmigrate.srcd.storage import CopiedDisk

log = structlog.get_logger("vmmigrate.srcd.mirror")

POLL = 0.25  # seconds between query-jobs while waiting for the mirrors (events wake it)
END_TIMEOUT = 30.0  # seconds for the mirrors to end once asked
# a job in one of these states has ended (or is ending) by itself
ENDED = frozenset({"aborting", "concluded", "null"})
# in step with its source: "standby" is a ready job paused (while the guest stops)
IN_STEP = frozenset({"ready", "standby"})


class MirrorState(enum.Enum):
    COPYING = "copying"  # some disk is still catching up
    READY = "ready"  # every copy is in step with its source
    FAILED = "failed"  # a copy failed or went away


@dataclasses.dataclass(frozen=True)
class Assessment:
    state: MirrorState
    target: str = ""  # the failed disk
    error: str = ""  # QEMU's reason, if it gave one

    def failure(self) -> OperationFailed:
        """libvirt's words for a failed disk copy."""
        if self.error:
            return OperationFailed(f"migration of disk {self.target} failed: {self.error}")
        return OperationFailed(f"migration of disk {self.target} failed")


def assess(copies: Sequence[CopiedDisk], jobs: Sequence[dict[str, Any]]) -> Assessment:
    """The mirrors' state from QMP query-jobs (no I/O: a table-testable policy). A job
    that is gone, ending, or carries an error, while the copy is still wanted, failed."""
    by_id = {str(j.get("id")): j for j in jobs}
    ready = True
    for copy in copies:
        job = by_id.get(copy.export)
        if job is None:
            return Assessment(MirrorState.FAILED, copy.target, "its block job is gone")
        if job.get("error") or job.get("status") in ENDED:
            return Assessment(MirrorState.FAILED, copy.target, str(job.get("error") or ""))
        ready = ready and job.get("status") in IN_STEP
    return Assessment(MirrorState.READY if ready else MirrorState.COPYING)


def totals(copies: Sequence[CopiedDisk], jobs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The mirrors' bytes, as domjobinfo's File lines show them (query-jobs progress:
    libvirt's mirror statistics)."""
    wanted = {c.export for c in copies}
    mine = [j for j in jobs if j.get("id") in wanted]
    total = sum(int(j.get("total-progress", 0)) for j in mine)
    done = sum(int(j.get("current-progress", 0)) for j in mine)
    return {"total": total, "transferred": done, "remaining": max(total - done, 0)}


def sync_mode(flags: MigrateFlag) -> str:
    """--copy-storage-inc copies the top layer only; --copy-storage-all the whole disk."""
    return "top" if MigrateFlag.NON_SHARED_INC in flags else "full"


def nbd_server(ctx: SourceContext, job: SourceJob, cookie: bytes, uri: str) -> dict[str, Any]:
    """Where the mirrors write, directly: the destination's NBD server, on the host of the
    migration URI (libvirt's default) at the port Prepare's ``<nbd>`` names."""
    nbd = _prepared_nbd(ctx, job, cookie)
    if nbd is None or not nbd.port:
        raise OperationFailed("the destination did not start an NBD server for storage copy")
    host, _ = parse_hostport(uri.partition(":")[2])
    return {"type": "inet", "host": host, "port": str(nbd.port)}


def _prepared_nbd(ctx: SourceContext, job: SourceJob, cookie: bytes) -> Nbd | None:
    if not cookie:
        return None
    parsed = parse_cookie(
        cookie,
        accept=ACCEPT_PERFORM,
        local_hostuuid=ctx.store.identity.host_uuid,
        expect_uuid=job.domain.uuid,
    )
    return parsed.nbd


def check_tunnelled_nbd(ctx: SourceContext, job: SourceJob, cookie: bytes) -> None:
    """Tunnelled: the destination must have started its NBD server (on its socket)."""
    if _prepared_nbd(ctx, job, cookie) is None:
        raise OperationFailed("the destination did not start an NBD server for storage copy")


def _nothing() -> None:
    """No event subscription to end."""


class Mirrors:
    """The mirror jobs of one migration's copied disks, on the source emulator."""

    def __init__(self, ctx: SourceContext, job: SourceJob, server: dict[str, Any]) -> None:
        self.ctx = ctx
        self.job = job
        self.copies = job.copies
        self.server = server
        self.nodes: list[str] = []  # NBD client nodes added (removed at the end)
        self.jobs: list[str] = []  # mirror jobs started
        self.broken: Assessment | None = None  # a copy that failed, seen in an event
        self._ending = False
        self._wake = asyncio.Event()
        self._mon: QMPClient | None = None
        self._unsubscribe: Callable[[], None] = _nothing

    @property
    def active(self) -> bool:
        """Copying, and not being ended."""
        return bool(self.jobs) and not self._ending

    @staticmethod
    def node_of(copy: CopiedDisk) -> str:
        return f"migration-{copy.target}-storage"  # libvirt's name

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "JOB_STATUS_CHANGE":
            return
        data = event.get("data", {})
        self._wake.set()
        if not self._ending and data.get("id") in self.jobs and data.get("status") in ENDED:
            target = next(c.target for c in self.copies if c.export == data.get("id"))
            self.broken = self.broken or Assessment(MirrorState.FAILED, target)

    async def start(self, mon: QMPClient) -> None:
        """An NBD node and a mirror job per copied disk."""
        self._mon = mon
        self._unsubscribe = mon.on_event(self._on_event)
        mib = self.job.params.bandwidth_mib or self.ctx.max_speed_mib.get(self.job.domain.uuid, 0)
        for copy in self.copies:
            node = self.node_of(copy)
            try:
                await mon.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": node,
                        "server": self.server,
                        "export": copy.export,
                    },
                    timeout=self.ctx.config.rpc_timeout,
                )
                self.nodes.append(node)
                await mon.execute("blockdev-mirror", self._mirror_args(copy, node, mib))
            except QMPError as exc:
                raise Assessment(MirrorState.FAILED, copy.target, str(exc)).failure() from exc
            self.jobs.append(copy.export)
        log.info("mirrors_started", migration_id=self.job.migration_id, disks=len(self.copies))

    def _mirror_args(self, copy: CopiedDisk, node: str, mib: int) -> dict[str, Any]:
        return {
            "job-id": copy.export,
            "device": copy.node,
            "target": node,
            "sync": sync_mode(self.job.flags),
            # libvirt gives the mirrors the migration's bandwidth
            "speed": mib * 1024 * 1024,
            "auto-finalize": True,
            "auto-dismiss": False,
        }

    async def query(self) -> Assessment:
        """One look at the jobs: the figures for domjobinfo, and their state."""
        assert self._mon is not None
        jobs = await self._mon.execute("query-jobs")
        jobs = jobs if isinstance(jobs, list) else []
        self.job.mirror = totals(self.copies, jobs)
        return assess(self.copies, jobs)

    async def sleep(self, seconds: float = POLL) -> None:
        """Until the next job event or ``seconds``."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def complete(self) -> None:
        """The guest is paused before the switch-over: end every mirror with its copy in
        step (a ready job cancelled completes), then remove the NBD nodes."""
        found = await self.query()
        if found.state is MirrorState.FAILED:
            raise found.failure()
        if found.state is not MirrorState.READY:  # QEMU pauses only once they are in step
            raise OperationFailed("storage copy is not in step at the switch-over")
        self._ending = True
        assert self._mon is not None
        for job_id in self.jobs:
            await self._mon.execute("block-job-cancel", {"device": job_id})
        errors = await self._wait_ended()
        if errors:
            raise Assessment(MirrorState.FAILED, *errors[0]).failure()
        # Ended in step with the guest paused: all of it is on the destination. The look
        # before the cancel may still count what the guest wrote just before its pause
        # (QEMU's ready mirror flushes it as it completes), and domjobinfo --completed
        # reports a finished copy, as libvirt does.
        total = self.job.mirror.get("total", 0)
        self.job.mirror = {"total": total, "transferred": total, "remaining": 0}
        await self._release()
        log.info("mirrors_completed", migration_id=self.job.migration_id, **self.job.mirror)

    async def _wait_ended(self) -> list[tuple[str, str]]:
        """Wait until every mirror job has concluded; (target, error) of those that
        failed. A job that does not end in time is a failure."""
        assert self._mon is not None
        until = time.monotonic() + END_TIMEOUT
        while True:
            jobs = await self._mon.execute("query-jobs")
            by_id = {str(j.get("id")): j for j in jobs if isinstance(j, dict)}
            pending = [
                i
                for i in self.jobs
                if by_id.get(i, {}).get("status") not in (None, "concluded", "null")
            ]
            if not pending or time.monotonic() > until:
                break
            await self.sleep(0.05)
        by_target = {c.export: c.target for c in self.copies}
        failed = [(by_target[i], "it did not end in time") for i in pending]
        failed += [
            (by_target[i], str(by_id[i]["error"]))
            for i in self.jobs
            if by_id.get(i, {}).get("error")
        ]
        return failed

    async def _release(self) -> None:
        """Dismiss the concluded jobs and remove the NBD nodes (the source's own disks
        were never changed)."""
        assert self._mon is not None
        for job_id in self.jobs:
            with contextlib.suppress(QMPError):
                await self._mon.execute("job-dismiss", {"id": job_id})
        self.jobs = []
        for node in self.nodes:
            with contextlib.suppress(QMPError):
                await self._mon.execute("blockdev-del", {"node-name": node})
        self.nodes = []
        self._unsubscribe()

    async def abort(self) -> None:
        """After any failure: cancel every mirror by force and remove its node; the
        source goes on with its own disks. Best effort: the emulator may be gone."""
        if self._mon is None or not (self.jobs or self.nodes):
            self._unsubscribe()
            return
        self._ending = True
        try:
            for job_id in self.jobs:
                with contextlib.suppress(QMPError):
                    await self._mon.execute("block-job-cancel", {"device": job_id, "force": True})
            await yank_nbd(self._mon.execute, self.nodes)
            await self._wait_ended()
            await self._release()
        except QMPError as exc:
            log.warning("mirrors_not_released", migration_id=self.job.migration_id, error=str(exc))
        finally:
            self._unsubscribe()
        log.info("mirrors_cancelled", migration_id=self.job.migration_id)


Execute = Callable[..., Awaitable[Any]]


async def yank_nbd(execute: Execute, nodes: Sequence[str]) -> None:
    """Shut down the NBD client connections of ``nodes`` (QMP ``yank``), when a copy is
    given up. A destination that stopped answering (the link cut) leaves the mirror's
    writes in flight until TCP gives up, many minutes later: the job cannot end before,
    and removing the node (``blockdev-del``, whose NBD disconnect waits on the dead
    connection) would block the emulator's main loop, its monitor and its guest with it.
    Yanked, the writes fail at once. Best effort: an emulator without ``yank`` (QEMU < 6.0)
    keeps the old behaviour."""
    if not nodes:
        return
    instances = [{"type": "block-node", "node-name": node} for node in nodes]
    try:
        await execute("yank", {"instances": instances})
    except QMPError as exc:
        log.warning("nbd_not_yanked", nodes=list(nodes), error=str(exc))


async def release_leftovers(hv: QMPHypervisor, uuid: str) -> int:
    """After srcd died during a storage copy (recovery): cancel by force the mirror jobs it
    left in the source emulator and remove their NBD nodes (libvirt's names), so that the
    source runs on its own disks alone and the next copy can start; returns how many jobs
    were found. Best effort: the emulator may be gone."""
    try:
        jobs = await hv.execute(uuid, "query-jobs")
        ids = [
            str(j["id"])
            for j in jobs
            if j.get("type") == "mirror" and str(j.get("id", "")).startswith("drive-")
        ]
        for job_id in ids:
            with contextlib.suppress(QMPError):
                await hv.execute(uuid, "block-job-cancel", {"device": job_id, "force": True})
        found = await hv.execute(uuid, "query-named-block-nodes", {"flat": True})
        nodes = [str(n.get("node-name", "")) for n in found]
        nodes = [n for n in nodes if n.startswith("migration-") and n.endswith("-storage")]
        await yank_nbd(functools.partial(hv.execute, uuid), nodes)
        until = time.monotonic() + END_TIMEOUT
        while ids and time.monotonic() < until:
            jobs = await hv.execute(uuid, "query-jobs")
            if all(j.get("status") in ("concluded", "null") for j in jobs if j.get("id") in ids):
                break
            await asyncio.sleep(0.05)
        for job_id in ids:
            with contextlib.suppress(QMPError):
                await hv.execute(uuid, "job-dismiss", {"id": job_id})
        for name in nodes:
            with contextlib.suppress(QMPError):
                await hv.execute(uuid, "blockdev-del", {"node-name": name})
    except (QMPError, VmmigrateError, OSError) as exc:
        log.warning("mirror_leftovers_not_released", uuid=uuid, error=str(exc))
        return 0
    return len(ids)
