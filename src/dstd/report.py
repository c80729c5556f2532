"""What dstd reports of its incoming migrations: a history record and the metrics for
each incoming job that ends (IncomingTable.on_drop).

The destination does not see the stream's bytes (the emulators carry it): its records
and its bytes metric leave them at 0; the source's say how much moved.
"""

from __future__ import annotations

import time

import structlog
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.history import HistoryRecord
from vmmigrate.common.observe import Observability, kind_of, mode_of, phase_durations
from vmmigrate.dstd.incoming import IncomingJob

log = structlog.get_logger("vmmigrate.dstd.report")


def destination_record(job: IncomingJob) -> HistoryRecord:
    return HistoryRecord(
        migration_id=job.migration_id,
        domain=job.target.name,
        domain_uuid=job.target.uuid,
        role="destination",
        peer=job.record.peer,
        kind=kind_of(job.flags),
        mode=mode_of(job.flags),
        result=job.result or "failed",
        error=job.error,
        started_unix=job.started_unix,
        ended_unix=time.time(),
    )


def job_dropped(obs: Observability, job: IncomingJob) -> None:
    """Never raises: the job has ended whatever the report does."""
    try:
        obs.record(destination_record(job), phase_durations(job.entered, time.monotonic()))
    except (OSError, VmmigrateError) as exc:
        log.warning("history_not_written", migration_id=job.migration_id, error=str(exc))
