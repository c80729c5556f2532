"""What dstd reports of its incoming migrations: a history record and the metrics for
each incoming job that ends (IncomingTable.on_drop).

The stream passes from emulator to emulator, so dstd does not count its bytes itself: as
libvirt's destination does, it takes the migration's statistics from the Perform cookie's
``<statistics>`` that Finish receives (srcd/perform.py writes them), and records them as
its completed job: downtime, time elapsed, memory processed and total, so that the
destination's history, bytes metric and ``domjobinfo --completed`` say how much moved.
An offline migration (no stream, no cookie) records none.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from vmmigrate.common import events
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.history import JOB_ELAPSED, HistoryRecord
from vmmigrate.common.hypervisor import EmulatorExit, RuntimeRecord
from vmmigrate.common.observe import Observability, kind_of, mode_of, phase_durations
from vmmigrate.dstd.context import DestinationContext
from vmmigrate.dstd.incoming import IncomingJob

log = structlog.get_logger("vmmigrate.dstd.report")

# The cookie's counters (libvirt's element names) as query-migrate's fields, the shape a
# source's statistics have, so that domjobinfo reads both roles' records alike
# (srcd/report.py job_info). Counters not listed are not shown by domjobinfo.
_RAM_FIELDS = {
    "memory_total": "total",
    "memory_processed": "transferred",
    "memory_remaining": "remaining",
    "memory_dirty_rate": "dirty-pages-rate",
    "memory_iteration": "dirty-sync-count",
    "memory_page_size": "page-size",
}
_DISK_FIELDS = {
    "disk_total": "total",
    "disk_processed": "transferred",
    "disk_remaining": "remaining",
}
_TOP_FIELDS = {
    "downtime": "downtime",
    "setup_time": "setup-time",
    "auto_converge_throttle": "cpu-throttle-percentage",
}


def _counter(text: str) -> int | None:
    """A counter's value; None for one that is not a plain unsigned number (ignored, as
    libvirt ignores a counter it cannot read: the statistics never fail a Finish)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def cookie_statistics(
    pairs: tuple[tuple[str, str], ...], received_unix: float, ended_unix: float
) -> dict[str, Any]:
    """The Perform cookie's ``<statistics>`` as query-migrate's shape, plus the job's
    elapsed time (``JOB_ELAPSED``): the source's ``time_elapsed`` when it sent the cookie
    (its job's time since Begin), plus the time from its arrival here (Finish) to the end
    of the job here. Only durations are added, so the two hosts' clocks need not agree."""
    values = {name: v for name, text in pairs if (v := _counter(text)) is not None}
    stats: dict[str, Any] = {t: values[n] for n, t in _TOP_FIELDS.items() if n in values}
    ram: dict[str, float] = {f: values[n] for n, f in _RAM_FIELDS.items() if n in values}
    if "memory_bps" in values:
        ram["mbps"] = values["memory_bps"] * 8 / 1_000_000  # query-migrate's unit: Mbit/s
    if ram:
        stats["ram"] = ram
    disk = {f: values[n] for n, f in _DISK_FIELDS.items() if n in values}
    if disk:  # a storage copy's disk counters, the mirrors' shape on the source
        stats["mirror"] = disk
    if "time_elapsed" in values:
        since = max(0, int((ended_unix - received_unix) * 1000))
        stats[JOB_ELAPSED] = values["time_elapsed"] + since
    return stats


def destination_record(job: IncomingJob) -> HistoryRecord:
    ended = time.time()
    stats = (
        cookie_statistics(job.cookie_stats, job.cookie_received_unix, ended)
        if job.cookie_stats
        else {}
    )
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
        ended_unix=ended,
        bytes=int(stats.get("ram", {}).get("transferred", 0)),
        downtime_ms=int(stats.get("downtime", 0)),
        stats=stats,
    )


def job_dropped(obs: Observability, job: IncomingJob) -> None:
    """Never raises: the job has ended whatever the report does."""
    try:
        obs.record(destination_record(job), phase_durations(job.entered, time.monotonic()))
    except (OSError, VmmigrateError) as exc:
        log.warning("history_not_written", migration_id=job.migration_id, error=str(exc))


def emulator_gone(ctx: DestinationContext, rec: RuntimeRecord, how: EmulatorExit) -> None:
    """An emulator dstd started went without being asked (QMPHypervisor.on_gone): once
    Finish announced its domain (Started Migrated), the domain stopped: Stopped Failed, or
    Stopped Shutdown. Before, it is the incoming migration that fails (Finish reports it),
    and no event is sent: the host never said the domain had started."""
    job = ctx.incoming.for_domain(rec.uuid)
    if job is not None and not job.announced:
        log.warning("incoming_emulator_gone", migration_id=job.migration_id, how=how.describe())
        return
    ctx.obs.events.emit(rec.name, rec.uuid, events.stopped_unasked(how.clean))
