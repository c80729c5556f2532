"""What srcd reports of its migrations: a history record and the metrics for each source
job that ends, and the history served to clients (ListJobs, domjobinfo --completed)."""

from __future__ import annotations

import time

import structlog
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.history import HistoryRecord
from vmmigrate.common.observe import Observability, kind_of, mode_of, phase_durations
from vmmigrate.common.phase import Phase
from vmmigrate.srcd.jobs import JobOutcome, SourceJob

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
