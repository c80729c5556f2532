"""The source's Perform phase for a live migration (libvirt's qemuMigrationSrcRun).

Policy and mechanism are kept apart: :func:`decide` is a pure function of the job's
situation (tested with tables); :func:`perform_live` does the I/O: QMP migrate, then watch
the migration (MIGRATION events, and query-migrate for statistics) until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from vmmigrate.common.cookie import MigrationCookie, format_cookie
from vmmigrate.common.errors import (
    OperationAborted,
    OperationFailed,
    PeerUnavailable,
    Timeout,
    VmmigrateError,
)
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.phase import Phase
from vmmigrate.common.qmp import QMPClient, QMPError
from vmmigrate.srcd.context import SourceContext
from vmmigrate.srcd.jobs import JobOutcome, SourceJob
from vmmigrate.srcd.mirror import Mirrors, MirrorState
from vmmigrate.srcd.switchover import (
    SwitchoverPolicy,
    changed_enough,
    measured_bandwidth,
    passes_of,
)

log = structlog.get_logger("vmmigrate.srcd.perform")

UNLIMITED_BPS = 2**53  # QMP max-bandwidth takes bytes/s; libvirt's "unlimited"
STATS_INTERVAL = 0.25  # seconds between query-migrate calls while waiting for events


class Action(enum.Enum):
    WAIT = "wait"  # keep watching
    SUSPEND = "suspend"  # --timeout passed with --timeout-suspend: pause the guest
    CANCEL_TIMEOUT = "cancel_timeout"  # --timeout passed without it: abort the migration
    CANCEL_ABORT = "cancel_abort"  # a client asked (domjobabort, Ctrl-C)
    CANCEL_PEER_LOST = "cancel_peer_lost"  # the destination stopped answering (keepalive)
    CANCEL_DEADLINE = "cancel_deadline"  # the whole migration's deadline passed
    CANCEL_STORAGE = "cancel_storage"  # a disk's copy failed (storage copy)


def decide(
    *,
    elapsed: float,
    timeout_s: int,
    timeout_suspend: bool,
    suspended: bool,
    abort_requested: bool,
    cancelling: bool,
    peer_lost: bool = False,
    deadline_passed: bool = False,
    storage_failed: bool = False,
) -> Action:
    """What to do next in a running migration (no I/O: a table-testable policy)."""
    if cancelling:
        return Action.WAIT
    if abort_requested:
        return Action.CANCEL_ABORT
    if peer_lost:
        return Action.CANCEL_PEER_LOST
    if storage_failed:
        return Action.CANCEL_STORAGE
    if deadline_passed:
        return Action.CANCEL_DEADLINE
    if timeout_s and elapsed >= timeout_s:
        if timeout_suspend:
            return Action.WAIT if suspended else Action.SUSPEND
        return Action.CANCEL_TIMEOUT
    return Action.WAIT


def switchover_policy(ctx: SourceContext) -> SwitchoverPolicy:
    return SwitchoverPolicy(
        floor_ms=ctx.config.downtime_limit_ms, ceiling_ms=ctx.config.downtime_limit_max_ms
    )


def bandwidth_bps(ctx: SourceContext, job: SourceJob) -> int:
    mib = job.params.bandwidth_mib or ctx.max_speed_mib.get(job.domain.uuid, 0)
    return mib * 1024 * 1024 if mib else UNLIMITED_BPS


Probe = Callable[[], Awaitable[None]]


async def _keepalive(job: SourceJob, probe: Probe, interval: float) -> None:
    """libvirt's keepalive on the destination connection during Perform: a destination
    that stops answering marks the job, and the watch loop cancels the stream (a dead
    peer's TCP connection can otherwise hang for many minutes)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await probe()
        except (PeerUnavailable, Timeout) as exc:
            log.warning("peer_lost", migration_id=job.migration_id, error=str(exc))
            job.peer_lost = True
            return


async def perform_live(
    ctx: SourceContext,
    job: SourceJob,
    *,
    uri: str,
    probe: Probe | None = None,
    nbd: dict[str, Any] | None = None,
) -> bytes:
    """Migrate the running domain's memory to ``uri`` (after its copied disks, into the
    destination's NBD server at ``nbd``: srcd/mirror.py); returns the cookie for Finish.

    On success the source is left paused (postmigrate) for Confirm to stop it. On failure
    the error is raised, the disk mirrors are cancelled (the source keeps its own disks)
    and the source is left for Confirm(cancelled) to resume.
    """
    job.advance(Phase.PERFORM3)
    # on disk before the stream (or a disk's copy) starts: _migrate awaits it; the
    # emulator's set-up goes on meanwhile
    journal = asyncio.ensure_future(asyncio.to_thread(ctx.store.journal_put, job.record))
    try:
        mon = await ctx.hypervisor.monitor(job.domain.uuid)
    except BaseException:
        await _settled(journal)
        raise
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    unsubscribe = mon.on_event(
        lambda e: events.put_nowait(e) if e.get("event") == "MIGRATION" else None
    )
    keepalive: asyncio.Task[None] | None = None
    if probe is not None:
        interval = max(ctx.config.rpc_timeout / 3, 0.5)
        keepalive = asyncio.ensure_future(_keepalive(job, probe, interval))
    mirrors = Mirrors(ctx, job, nbd) if job.copies and nbd is not None else None
    try:
        await _migrate(ctx, job, mon, uri, events, mirrors=mirrors, journal=journal)
    except QMPError as exc:
        job.outcome, job.error = JobOutcome.FAILED, str(exc)
        await _abort_mirrors(mirrors)
        if ctx.hypervisor.record(job.domain.uuid) is None:
            raise OperationFailed("domain unexpectedly quit during migration") from exc
        raise OperationFailed(f"job 'migration out' failed: {exc}") from exc
    except BaseException:
        await _abort_mirrors(mirrors)
        raise
    finally:
        unsubscribe()
        if keepalive is not None:
            keepalive.cancel()
        await _settled(journal)  # no exit leaves the write in flight
    return await _performed(ctx, job)


async def _settled(task: asyncio.Future[None]) -> None:
    """Until ``task`` has ended, whatever its outcome (the caller reports the first error)."""
    with contextlib.suppress(Exception):
        await task


async def _abort_mirrors(mirrors: Mirrors | None) -> None:
    if mirrors is not None:
        await asyncio.shield(mirrors.abort())


async def _migrate(
    ctx: SourceContext,
    job: SourceJob,
    mon: QMPClient,
    uri: str,
    events: asyncio.Queue[dict[str, Any]],
    *,
    mirrors: Mirrors | None,
    journal: asyncio.Future[None],
) -> None:
    """The stream's settings, the disks' copy (until in step), then QMP migrate and the
    watch until it ends. ``journal``: the PERFORM3 record's write, awaited before anything
    moves (a restarted srcd must know to cancel the stream)."""
    params, caps = _stream_settings(ctx, job)
    await mon.execute("migrate-set-capabilities", {"capabilities": caps})
    await mon.execute("migrate-set-parameters", params)
    await journal
    await ctx.failpoints.hit("srcd.perform.before_migrate")
    w = _Watch(started=time.monotonic())  # --timeout counts the disks' copy too
    if ctx.max_downtime_ms.get(job.domain.uuid) is None:
        w.policy, w.downtime_ms = switchover_policy(ctx), params["downtime-limit"]
    if mirrors is not None:
        await mirrors.start(mon)
        await _wait_mirrors(ctx, job, mirrors, w)
    await mon.execute("migrate", {"uri": uri})
    log.info(
        "perform_started",
        migration_id=job.migration_id,
        uri=uri,
        bandwidth=params["max-bandwidth"],
        downtime_limit=params["downtime-limit"],
        copied=len(job.copies) or None,
    )
    await _watch(ctx, job, events, mirrors, w)
    await ctx.failpoints.hit("srcd.perform.after_migrate")


async def _wait_mirrors(ctx: SourceContext, job: SourceJob, mirrors: Mirrors, w: _Watch) -> None:
    """Until every copied disk is in step with its source (libvirt waits for each job's
    ready state before it migrates the memory). A failed copy, an abort, a lost
    destination, --timeout or the deadline fail the migration before any memory moves
    (--timeout-suspend pauses the guest instead, and the copy goes on)."""
    while True:
        found = await mirrors.query()
        if found.state is MirrorState.READY:
            log.info("mirrors_ready", migration_id=job.migration_id, **job.mirror)
            return
        if found.state is MirrorState.FAILED:
            error = found.failure()
            job.outcome, job.error = JobOutcome.FAILED, str(error)
            raise error
        action = _decision(job, w, storage_failed=False)
        if action is Action.SUSPEND:
            await _suspend(ctx, job, w)
        elif action is not Action.WAIT:
            job.outcome = JobOutcome.CANCELLED
            raise _cancelled_error(job, action)
        await mirrors.sleep()


def _stream_settings(
    ctx: SourceContext, job: SourceJob
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(migrate-set-parameters, migrate-set-capabilities) for this job's stream."""
    bandwidth = bandwidth_bps(ctx, job)
    params: dict[str, Any] = {"max-bandwidth": bandwidth}
    # migrate-setmaxdowntime's limit as given; else the switch-over policy's, from the
    # cap while QEMU has measured nothing (unknown when unlimited: the floor)
    downtime = ctx.max_downtime_ms.get(job.domain.uuid)
    if not downtime:
        known = bandwidth if bandwidth < UNLIMITED_BPS else 0
        downtime = switchover_policy(ctx).limit_ms(bandwidth_bps=known)
    params["downtime-limit"] = downtime
    caps = [
        {"capability": "auto-converge", "state": MigrateFlag.AUTO_CONVERGE in job.flags},
        {"capability": "events", "state": True},
    ]
    rec = ctx.hypervisor.record(job.domain.uuid)
    if job.copies or (rec is not None and rec.emulator == "qemu"):
        # storage copy: QEMU pauses before the switch-over so that the mirrors end while
        # the guest is stopped (libvirt's sequence); set either way, as QEMU keeps it
        caps.append({"capability": "pause-before-switchover", "state": bool(job.copies)})
    return params, caps


async def _performed(ctx: SourceContext, job: SourceJob) -> bytes:
    """The stream completed: PERFORM3_DONE, and the cookie for Finish."""
    job.advance(Phase.PERFORM3_DONE)
    if job.peer:
        # The guest is paused until the destination's Finish resumes it: no fsync here.
        # With a destination to ask, a restarted srcd settles PERFORM3 and PERFORM3_DONE
        # alike (srcd/recovery.py), so losing this record to a power cut changes nothing.
        ctx.store.journal_put(job.record, durable=False)
    else:
        # libvirt's rule applies without a destination: PERFORM3_DONE must survive
        await asyncio.to_thread(ctx.store.journal_put, job.record)
    identity = ctx.store.identity
    return format_cookie(
        MigrationCookie(
            name=job.domain.name,
            uuid=job.domain.uuid,
            hostname=identity.hostname,
            hostuuid=identity.host_uuid,
            statistics=_cookie_stats(job.all_stats(), job.started_unix),
        )
    )


def _cookie_stats(info: dict[str, Any], started_unix: float) -> tuple[tuple[str, str], ...]:
    """The Perform cookie's <statistics> in libvirt's names and meanings: ``started`` is the
    job's start (Begin) and ``time_elapsed`` the job's time so far, both in ms, as libvirt's
    source sends them; the destination records them as its completed job (dstd/report.py)."""
    ram = info.get("ram", {})
    now_ms = int(time.time() * 1000)
    started_ms = min(int(started_unix * 1000), now_ms)
    pairs = [
        ("started", str(started_ms)),
        ("stopped", str(now_ms)),
        ("sent", str(now_ms)),
        ("time_elapsed", str(now_ms - started_ms)),
        ("downtime", str(info.get("downtime", 0))),
        ("setup_time", str(info.get("setup-time", 0))),
        ("memory_total", str(ram.get("total", 0))),
        ("memory_processed", str(ram.get("transferred", 0))),
        ("memory_remaining", str(ram.get("remaining", 0))),
        ("memory_bps", str(int(ram.get("mbps", 0) * 1_000_000 / 8))),
        ("memory_dirty_rate", str(ram.get("dirty-pages-rate", 0))),
        ("memory_iteration", str(ram.get("dirty-sync-count", 0))),
        ("memory_page_size", str(ram.get("page-size", 4096))),
        ("auto_converge_throttle", str(info.get("cpu-throttle-percentage", 0))),
    ]
    disk = info.get("mirror")
    if disk:  # storage copy: libvirt's disk counters, after the memory's
        pairs += [
            ("disk_total", str(disk.get("total", 0))),
            ("disk_processed", str(disk.get("transferred", 0))),
            ("disk_remaining", str(disk.get("remaining", 0))),
        ]
    return tuple(pairs)


def _cancelled_error(job: SourceJob, reason: Action) -> VmmigrateError:
    if reason is Action.CANCEL_TIMEOUT:
        job.error = "migration timed out"
        return OperationAborted(
            f"operation aborted: migration did not complete within {job.params.timeout_s} s"
        )
    if reason is Action.CANCEL_PEER_LOST:
        job.error = "Lost connection to destination host"
        return OperationFailed("Lost connection to destination host")
    if reason is Action.CANCEL_DEADLINE:
        job.error = "deadline passed"
        return Timeout(
            f"migration did not complete before its deadline ({job.deadline.seconds:.0f} s)"
        )
    job.error = "canceled by client"
    return OperationAborted("operation aborted: job 'migration out' canceled by client")


async def _completed(ctx: SourceContext, job: SourceJob, info: dict[str, Any]) -> None:
    job.outcome = JobOutcome.COMPLETED
    # QEMU may say "completed" a moment before it fills in its totals
    for _ in range(50):
        if info.get("total-time"):
            break
        await asyncio.sleep(0.001)
        info = await ctx.hypervisor.execute(job.domain.uuid, "query-migrate")
    job.stats = info
    log.info(
        "perform_completed",
        migration_id=job.migration_id,
        downtime_ms=info.get("downtime"),
        total_ms=info.get("total-time"),
    )


@dataclasses.dataclass
class _Watch:
    """What the watch of one running migration has decided so far."""

    started: float
    suspended: bool = False
    cancelling: bool = False
    reason: Action = Action.WAIT
    storage_error: VmmigrateError | None = None  # a disk copy failed: the cause
    continued: bool = False  # pre-switchover was handled (QEMU may still say it once more)
    # the switch-over policy and the downtime limit QEMU has now (None: a limit set by
    # migrate-setmaxdowntime holds as given)
    policy: SwitchoverPolicy | None = None
    downtime_ms: int = 0


async def _follow_bandwidth(
    ctx: SourceContext, job: SourceJob, info: dict[str, Any], w: _Watch
) -> None:
    """The downtime limit the policy gives for the stream as measured now, set when it
    changed (srcd/switchover.py); a migrate-setmaxdowntime during the migration ends it."""
    if w.policy is None or info.get("status") != "active":
        return
    if ctx.max_downtime_ms.get(job.domain.uuid) is not None:
        w.policy = None
        return
    limit = w.policy.limit_ms(bandwidth_bps=measured_bandwidth(info), passes=passes_of(info))
    if not changed_enough(w.downtime_ms, limit):
        return
    uuid = job.domain.uuid
    await ctx.hypervisor.execute(uuid, "migrate-set-parameters", {"downtime-limit": limit})
    log.debug("downtime_limit_set", migration_id=job.migration_id, ms=limit)
    w.downtime_ms = limit
    given = ctx.max_downtime_ms.get(uuid)
    if given is not None:  # set meanwhile (the command above may have overtaken it)
        w.policy = None
        await ctx.hypervisor.execute(uuid, "migrate-set-parameters", {"downtime-limit": given})


def _check_ended(job: SourceJob, info: dict[str, Any], w: _Watch) -> None:
    """Raise the migration's error if QEMU says it failed or was cancelled."""
    status = str(info.get("status", ""))
    if status == "failed" and w.reason in (Action.CANCEL_PEER_LOST, Action.CANCEL_STORAGE):
        status = "cancelled"  # the stream broke as we cancelled it: the cause is known
    if status == "failed":
        job.outcome = JobOutcome.FAILED
        job.error = str(info.get("error-desc", "unexpectedly failed"))
        raise OperationFailed(f"job 'migration out' failed: {job.error}")
    if status == "cancelled" and w.storage_error is not None:
        job.outcome, job.error = JobOutcome.FAILED, str(w.storage_error)
        raise w.storage_error
    if status == "cancelled":
        job.outcome = JobOutcome.CANCELLED
        raise _cancelled_error(job, w.reason)


async def _cancel(ctx: SourceContext, job: SourceJob, w: _Watch, reason: Action) -> None:
    log.info("migration_cancel", migration_id=job.migration_id, reason=reason.value)
    w.reason, w.cancelling = reason, True
    await ctx.hypervisor.execute(job.domain.uuid, "migrate_cancel")


async def _switch_over(
    ctx: SourceContext, job: SourceJob, mirrors: Mirrors | None, w: _Watch
) -> None:
    """QEMU paused the guest before the switch-over (pause-before-switchover): end the
    disk mirrors, then let the migration complete; a copy that failed cancels it."""
    w.continued = True
    try:
        if mirrors is not None:
            await mirrors.complete()
    except VmmigrateError as exc:
        w.storage_error = exc
        await _cancel(ctx, job, w, Action.CANCEL_STORAGE)
        return
    await ctx.hypervisor.execute(job.domain.uuid, "migrate-continue", {"state": "pre-switchover"})


def _decision(job: SourceJob, w: _Watch, *, storage_failed: bool) -> Action:
    """decide() on the job's situation now."""
    return decide(
        elapsed=time.monotonic() - w.started,
        timeout_s=job.params.timeout_s,
        timeout_suspend=job.params.timeout_suspend,
        suspended=w.suspended,
        abort_requested=job.abort_requested,
        cancelling=w.cancelling,
        peer_lost=job.peer_lost,
        deadline_passed=job.deadline.expired(),
        storage_failed=storage_failed,
    )


async def _suspend(ctx: SourceContext, job: SourceJob, w: _Watch) -> None:
    log.info("timeout_suspend", migration_id=job.migration_id)
    await ctx.hypervisor.execute(job.domain.uuid, "stop")
    w.suspended = True


async def _act(ctx: SourceContext, job: SourceJob, w: _Watch, mirrors: Mirrors | None) -> None:
    """One decision of the policy (decide()) for the running migration, carried out."""
    broken = mirrors.broken if mirrors is not None else None
    action = _decision(job, w, storage_failed=broken is not None)
    if action is Action.SUSPEND:
        await _suspend(ctx, job, w)
    elif action is not Action.WAIT:
        if broken is not None and action is Action.CANCEL_STORAGE:
            w.storage_error = broken.failure()
        await _cancel(ctx, job, w, action)


async def _watch(
    ctx: SourceContext,
    job: SourceJob,
    events: asyncio.Queue[dict[str, Any]],
    mirrors: Mirrors | None = None,
    w: _Watch | None = None,
) -> None:
    w = w or _Watch(started=time.monotonic())
    while True:
        info = await ctx.hypervisor.execute(job.domain.uuid, "query-migrate")
        if info:
            job.stats = info
        if info.get("status") == "completed":
            await _completed(ctx, job, info)
            return
        _check_ended(job, info, w)
        await _follow_bandwidth(ctx, job, info, w)
        if info.get("status") == "pre-switchover" and not (w.cancelling or w.continued):
            await _switch_over(ctx, job, mirrors, w)
        elif mirrors is not None and mirrors.active:
            await mirrors.query()  # the disks' figures, for domjobinfo
        await _act(ctx, job, w, mirrors)
        # sleep until the next event, the next statistics poll, or an abort request
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(
                min(STATS_INTERVAL, ctx.config.migration_poll_interval * 10)
            ):
                await events.get()
                while not events.empty():
                    events.get_nowait()
