"""The event log (append, follow, rotation) and the history (atomic records, pruning)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vmmigrate.common import events
from vmmigrate.common.history import History, HistoryRecord


def _rec(i: int, role: str = "source") -> HistoryRecord:
    return HistoryRecord(
        migration_id=f"m{i}", domain=f"d{i % 2}", domain_uuid=f"u{i % 2}", role=role,
        peer="p", kind="live", mode="p2p", result="completed",
        started_unix=1000.0 + i, ended_unix=1001.0 + i, bytes=i,
    )


def test_history_keeps_the_newest_within_the_limit(tmp_path: Path) -> None:
    h = History(tmp_path, limit=3)
    for i in range(5):
        h.add(_rec(i, "source" if i % 2 else "destination"))
    assert [r.migration_id for r in h.list()] == ["m2", "m3", "m4"]
    assert [r.migration_id for r in h.list(domain="d1")] == ["m3"]
    assert [r.migration_id for r in h.list(limit=2)] == ["m3", "m4"]
    assert History(tmp_path, limit=3).last("u0", "destination") == _rec(4, "destination")
    assert not list((tmp_path / "history").glob(".tmp-*"))


def test_history_prunes_in_batches_and_shows_only_the_limit(tmp_path: Path) -> None:
    from vmmigrate.common.history import PRUNE_EVERY

    h = History(tmp_path, limit=3)
    for i in range(3 * PRUNE_EVERY):
        h.add(_rec(i))
        on_disk = len(list((tmp_path / "history").glob("*.json")))
        assert on_disk <= 3 + PRUNE_EVERY
        assert len(h.list()) == min(i + 1, 3)
    assert [r.migration_id for r in h.list()] == [f"m{i}" for i in range(3 * PRUNE_EVERY - 3, 3 * PRUNE_EVERY)]


def test_history_skips_an_unreadable_record(tmp_path: Path) -> None:
    h = History(tmp_path)
    h.add(_rec(1))
    (tmp_path / "history" / "00000000000000000001-source-bad.json").write_text("{not json")
    assert [r.migration_id for r in h.list()] == ["m1"]


def test_follow_sees_events_of_both_daemons_across_rotation(tmp_path: Path) -> None:
    src = events.EventLog(tmp_path, "srcd", max_bytes=1800)
    dst = events.EventLog(tmp_path, "dstd", max_bytes=1800)

    async def scenario() -> list[tuple[str, str, str, str]]:
        got: list[tuple[str, str, str, str]] = []
        stream = events.follow(src, interval=0.01)

        async def consume() -> None:
            async for ev in stream:
                got.append((ev.domain, ev.event, ev.detail, ev.daemon))
                if len(got) == 20:
                    return

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)  # the follower opened the log at its end
        for i in range(10):
            src.emit(f"vm{i}", "u", events.STARTED_BOOTED)
            dst.emit(f"vm{i}", "u", events.STARTED_MIGRATED)
            await asyncio.sleep(0.005)
        await asyncio.wait_for(task, 10)
        return got

    got = asyncio.run(scenario())
    assert got == [
        item
        for i in range(10)
        for item in ((f"vm{i}", "Started", "Booted", "srcd"), (f"vm{i}", "Started", "Migrated", "dstd"))
    ]
    assert (tmp_path / "events.log.1").exists()  # it was rotated on the way
    assert (tmp_path / "events.log").stat().st_size <= 1800


def test_event_text_is_virsh_wording() -> None:
    ev = events.Event("web", "u", *events.STOPPED_MIGRATED)
    assert ev.text() == "event 'lifecycle' for domain 'web': Stopped Migrated"
