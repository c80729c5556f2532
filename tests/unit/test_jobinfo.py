"""domjobinfo --completed and the history on both roles: the destination's statistics come
from the Perform cookie, and the newest finished job of a domain on a host is the one shown,
whichever its role."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from vmmigrate.common.cookie import ACCEPT_FINISH, MigrationCookie, format_cookie, parse_cookie
from vmmigrate.common.events import EventLog
from vmmigrate.common.history import JOB_ELAPSED, History, HistoryRecord
from vmmigrate.common.metrics import Metrics
from vmmigrate.common.observe import Observability
from vmmigrate.dstd.report import cookie_statistics
from vmmigrate.srcd.jobs import CompletedJob, JobOutcome
from vmmigrate.srcd.perform import _cookie_stats
from vmmigrate.srcd.report import completed_job_info, newest_completed, record_job_info

VECTORS = Path(__file__).resolve().parents[1] / "data" / "cookies"
UUID = "5d0c6a2e-8f43-4b7e-9a51-3c2f1e0d9b74"
SRC_HOST = "11111111-1111-4111-8111-111111111111"
DST_HOST = "22222222-2222-4222-8222-222222222222"


def _received(data: bytes) -> tuple[tuple[str, str], ...]:
    c = parse_cookie(data, accept=ACCEPT_FINISH, local_hostuuid=DST_HOST, expect_uuid=UUID)
    assert c.statistics is not None
    return c.statistics


def _record(stats: dict[str, object], **kw: object) -> HistoryRecord:
    fields: dict[str, object] = dict(
        migration_id="in-1", domain="vm", domain_uuid=UUID, role="destination", peer="",
        kind="live", mode="p2p", result="completed", started_unix=100.0, ended_unix=101.0,
        stats=stats,
    )
    fields.update(kw)
    return HistoryRecord(**fields)  # type: ignore[arg-type]


def test_libvirt_sources_cookie_gives_the_destination_its_figures() -> None:
    """libvirt's own Perform cookie (a real source's): the destination shows the
    downtime, memory figures and the job's time it carries."""
    pairs = _received((VECTORS / "live-managed-finish-A.xml").read_bytes())
    stats = cookie_statistics(pairs, received_unix=50.0, ended_unix=50.25)
    assert stats["downtime"] == 19 and stats["setup-time"] == 1
    assert stats["ram"]["transferred"] == 735158 and stats["ram"]["total"] == 71761920
    assert stats[JOB_ELAPSED] == 388 + 250  # the source's time_elapsed, then Finish's here
    info = record_job_info(_record(stats))
    assert (info.type, info.operation, info.migration_id) == ("Completed", "Incoming migration", "in-1")
    assert info.downtime_ms == 19 and info.time_elapsed_ms == 638
    assert (info.data_processed, info.data_total, info.data_remaining) == (735158, 71761920, 0)
    assert info.memory_bps == 68784916 and info.iteration == 2 and info.page_size == 4096


def test_srcd_cookie_round_trip_to_the_destination_record() -> None:
    """srcd's Perform cookie carries libvirt's meanings (time_elapsed: the job's time since
    Begin), and the destination's figures equal the source's."""
    qmp = {
        "status": "completed", "downtime": 42, "setup-time": 3, "total-time": 900,
        "ram": {"total": 64 << 20, "transferred": 70_000_000, "remaining": 0, "mbps": 812.5,
                "dirty-pages-rate": 7, "dirty-sync-count": 4, "page-size": 4096},
    }
    begun = time.time() - 2.0
    pairs = _cookie_stats(qmp, begun)
    named = dict(pairs)
    assert int(named["started"]) == int(begun * 1000)
    assert 2000 <= int(named["time_elapsed"]) < 60_000
    data = format_cookie(MigrationCookie(name="vm", uuid=UUID, hostname="a", hostuuid=SRC_HOST,
                                         statistics=pairs))
    stats = cookie_statistics(_received(data), received_unix=10.0, ended_unix=10.0)
    info = record_job_info(_record(stats))
    assert info.downtime_ms == 42 and info.setup_time_ms == 3
    assert info.data_processed == 70_000_000 and info.data_total == 64 << 20
    assert info.memory_bps == round(812.5 * 1_000_000 / 8) and info.dirty_rate == 7
    assert info.time_elapsed_ms == int(named["time_elapsed"])


@pytest.mark.parametrize("text", ["", "-1", "12abc", " ", "1e3", "\u0663"])
def test_a_counter_that_is_not_a_number_is_ignored(text: str) -> None:
    stats = cookie_statistics((("downtime", text), ("memory_processed", "5")), 0.0, 0.0)
    assert "downtime" not in stats and stats["ram"] == {"transferred": 5}


def test_no_statistics_record_none() -> None:
    assert cookie_statistics((), 0.0, 0.0) == {}
    info = record_job_info(_record({}, started_unix=100.0, ended_unix=100.5))
    assert info.time_elapsed_ms == 500 and info.data_processed == 0


def _done(mid: str, ended: float) -> CompletedJob:
    return CompletedJob(migration_id=mid, outcome=JobOutcome.COMPLETED, error="", elapsed_ms=7,
                        stats={"downtime": 3}, ended_unix=ended)


@pytest.mark.parametrize(("done", "rec", "shown"), [
    (None, None, None),
    ("out-1@10", None, "out-1"),
    (None, "in-1@10", "in-1"),
    ("out-1@10", "in-1@20", "in-1"),  # came back after leaving: the incoming job is newer
    ("out-1@20", "in-1@10", "out-1"),  # left after coming in
    ("out-1@10", "out-1@11", "out-1"),  # the history's copy of srcd's own job
])
def test_the_newest_finished_job_wins_whichever_its_role(
    done: str | None, rec: str | None, shown: str | None
) -> None:
    def split(v: str) -> tuple[str, float]:
        mid, at = v.split("@")
        return mid, float(at)

    job = _done(*split(done)) if done else None
    record = None
    if rec:
        mid, at = split(rec)
        record = _record({}, migration_id=mid, ended_unix=at)
    newest = newest_completed(job, record)
    assert (newest.migration_id if newest else None) == shown
    if shown == "out-1":
        assert newest is job


def test_completed_job_info_after_the_domain_came_back(tmp_path: Path) -> None:
    """A -> B then B -> A: on A, srcd still holds its outgoing job in memory, but the
    incoming one dstd wrote to the history since is the one shown."""
    obs = Observability(Metrics("source"), EventLog(tmp_path, "srcd"), History(tmp_path))
    out = _done("out-1", time.time() - 5)
    obs.history.add(_record({"downtime": 3}, migration_id="out-1", role="source",
                            ended_unix=out.ended_unix + 0.01))
    before = asyncio.run(completed_job_info(out, obs, UUID))
    assert (before.migration_id, before.operation) == ("out-1", "Outgoing migration")
    assert before.time_elapsed_ms == 7  # srcd's own figures
    obs.history.add(_record({"downtime": 11, JOB_ELAPSED: 1234}, migration_id="in-2",
                            ended_unix=time.time()))
    after = asyncio.run(completed_job_info(out, obs, UUID))
    assert (after.migration_id, after.operation, after.type) == (
        "in-2", "Incoming migration", "Completed")
    assert after.downtime_ms == 11 and after.time_elapsed_ms == 1234
    # an offline migration since is no job domjobinfo shows
    obs.history.add(_record({}, migration_id="off-3", kind="offline", ended_unix=time.time()))
    assert asyncio.run(completed_job_info(out, obs, UUID)).migration_id == "in-2"
    # and a restarted srcd (nothing in memory) reads the same
    assert asyncio.run(completed_job_info(None, obs, UUID)).migration_id == "in-2"
    assert asyncio.run(completed_job_info(None, obs, "other")).type == "None"
