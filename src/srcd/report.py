"""What srcd reports of its migrations: a history record and the metrics for each source
job that ends, and the history served to clients (ListJobs, domjobinfo --completed).

``domjobinfo --completed`` shows the domain's last finished live migration on this host,
out or in, as libvirt shows the last completed job of the domain: the newest by end time
of the job srcd keeps in memory (its last outgoing one since it started) and of the host's
history (which also holds dstd's incoming ones, and srcd's from before a restart).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.history import JOB_ELAPSED, HistoryRecord
from vmmigrate.common.observe import Observability, kind_of, mode_of, phase_durations
from vmmigrate.common.phase import Phase
from vmmigrate.srcd.jobs import CompletedJob, JobOutcome, SourceJob

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.report")


def _result(job: SourceJob) -> str:
    if job.outcome:
        return str(job.outcome)
    if job.phase is Phase.CONFIRM3:
        return str(JobOutcome.COMPLETED)
    return str(JobOutcome.CANCELLED if job.abort_requested else JobOutcome.FAILED)


def source_record(job: SourceJob) -> HistoryRecord:
    ram = job.stats.get("ram", {})
    return HistoryRecord(
        migration_id=job.migration_id,
        domain=job.domain.name,
        domain_uuid=job.domain.uuid,
        role="source",
        peer=job.peer,
        kind=kind_of(job.flags),
        mode=mode_of(job.flags),
        result=_result(job),
        error=job.error,
        started_unix=job.started_unix,
        ended_unix=time.time(),
        bytes=int(ram.get("transferred", 0)),
        downtime_ms=int(job.stats.get("downtime", 0)),
        stats=job.all_stats(),
    )


def job_ended(obs: Observability, job: SourceJob) -> None:
    """SourceJobTable.on_end: never raises (the job has ended whatever the report does)."""
    try:
        obs.record(source_record(job), phase_durations(job.entered, time.monotonic()))
    except (OSError, VmmigrateError) as exc:
        log.warning("history_not_written", migration_id=job.migration_id, error=str(exc))


def record_to_pb(rec: HistoryRecord) -> pb.JobRecord:
    return pb.JobRecord(
        migration_id=rec.migration_id,
        domain=rec.domain,
        domain_uuid=rec.domain_uuid,
        role=rec.role,
        peer=rec.peer,
        kind=rec.kind,
        mode=rec.mode,
        result=rec.result,
        error=rec.error,
        started_unix=rec.started_unix,
        ended_unix=rec.ended_unix,
        bytes=rec.bytes,
        downtime_ms=rec.downtime_ms,
    )


_JOB_TYPES = {
    JobOutcome.COMPLETED: "Completed",
    JobOutcome.FAILED: "Failed",
    JobOutcome.CANCELLED: "Cancelled",
}


def job_info(stats: dict[str, Any], mid: str, elapsed_ms: int, kind: str, error: str) -> pb.JobInfo:
    """domjobinfo's answer from query-migrate's statistics (a source's, or a destination
    record's taken from the Perform cookie), and the disk mirrors' under "mirror": libvirt's
    Data lines count memory and disks together."""
    ram = stats.get("ram", {})
    disk = stats.get("mirror", {})
    memory = [int(ram.get(k, 0)) for k in ("total", "transferred", "remaining")]
    disks = [int(disk.get(k, 0)) for k in ("total", "transferred", "remaining")]
    return pb.JobInfo(
        type=kind,
        operation="Outgoing migration",
        migration_id=mid,
        time_elapsed_ms=elapsed_ms,
        data_total=memory[0] + disks[0],
        data_processed=memory[1] + disks[1],
        data_remaining=memory[2] + disks[2],
        memory_total=memory[0],
        memory_processed=memory[1],
        memory_remaining=memory[2],
        disk_total=disks[0],
        disk_processed=disks[1],
        disk_remaining=disks[2],
        memory_bps=round(float(ram.get("mbps", 0)) * 1_000_000 / 8),
        dirty_rate=int(ram.get("dirty-pages-rate", 0)),
        iteration=int(ram.get("dirty-sync-count", 0)),
        downtime_ms=int(stats.get("downtime", 0)),
        setup_time_ms=int(stats.get("setup-time", 0)),
        auto_converge_throttle=int(stats.get("cpu-throttle-percentage", 0)),
        page_size=int(ram.get("page-size", 4096)),
        error=error,
    )


def record_job_info(rec: HistoryRecord) -> pb.JobInfo:
    """domjobinfo --completed from a history record, of either role."""
    elapsed = rec.elapsed_ms
    if rec.role == "destination":
        elapsed = int(rec.stats.get(JOB_ELAPSED, elapsed))
    info = job_info(rec.stats, rec.migration_id, elapsed, rec.result.capitalize(), rec.error)
    if rec.role == "destination":
        info.operation = "Incoming migration"
    return info


def newest_completed(
    done: CompletedJob | None, rec: HistoryRecord | None
) -> CompletedJob | HistoryRecord | None:
    """Which of srcd's last outgoing job (in memory) and the history's last live record of
    the domain ended last. The history also holds the in-memory job itself (written just
    after it): then the in-memory one is shown, as it was before it was written."""
    if rec is None or (done is not None and done.migration_id == rec.migration_id):
        return done
    if done is None or rec.ended_unix > done.ended_unix:
        return rec
    return done


async def completed_job_info(
    done: CompletedJob | None, obs: Observability, uuid: str
) -> pb.JobInfo:
    """domjobinfo --completed: the domain's last live migration here, out or in."""
    found = await asyncio.to_thread(obs.history.list, uuid, 1, "", "live")
    newest = newest_completed(done, found[0] if found else None)
    if newest is None:
        return pb.JobInfo(type="None")
    if isinstance(newest, HistoryRecord):
        return record_job_info(newest)
    kind = _JOB_TYPES.get(newest.outcome, "Completed")
    return job_info(newest.stats, newest.migration_id, newest.elapsed_ms, kind, newest.error)
