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


def test_history_is_appended_to_segments_and_pruned_by_their_writer(tmp_path: Path) -> None:
    """Each writer appends to segments of its own (one file per SEGMENT_RECORDS records, not
    one per record) and removes its own segments once all their records are beyond the
    limit; readers show only the newest ``limit`` records of the host."""
    from vmmigrate.common.history import SEGMENT_RECORDS

    src = History(tmp_path, limit=SEGMENT_RECORDS, writer="srcd")
    dst = History(tmp_path, limit=SEGMENT_RECORDS, writer="dstd")
    for i in range(4 * SEGMENT_RECORDS):
        (src if i % 4 else dst).add(_rec(i, "source" if i % 4 else "destination"))
        shown = src.list()
        assert len(shown) == min(i + 1, SEGMENT_RECORDS)
        assert shown[-1].migration_id == f"m{i}"
    segments = sorted(p.name for p in (tmp_path / "history").iterdir())
    assert all(n.endswith(".jsonl") for n in segments)
    # srcd wrote 3 segments' worth, dstd 1: the oldest srcd segment (all beyond the limit)
    # went when srcd started its fourth; dstd's only one is still being written
    assert len([n for n in segments if "-srcd-" in n]) <= 3
    assert len([n for n in segments if "-dstd-" in n]) == 1
    want = [f"m{i}" for i in range(3 * SEGMENT_RECORDS, 4 * SEGMENT_RECORDS)]
    assert [r.migration_id for r in History(tmp_path, limit=SEGMENT_RECORDS).list()] == want
    # a reader in another process (here: another object) sees what was added since
    src.add(_rec(10_000))
    assert History(tmp_path, limit=SEGMENT_RECORDS).list()[-1].migration_id == "m10000"


def test_history_skips_an_unreadable_record_and_a_line_being_written(tmp_path: Path) -> None:
    h = History(tmp_path)
    h.add(_rec(1))
    (tmp_path / "history" / "00000000000000000001-source-bad.json").write_text("{not json")
    segment = next((tmp_path / "history").glob("*.jsonl"))
    with segment.open("ab") as fh:
        fh.write(b'{"migration_id": "half')  # a record still being written: not shown yet
    reader = History(tmp_path)
    assert [r.migration_id for r in reader.list()] == ["m1"]
    History(tmp_path).add(_rec(2))  # a writer that died mid-line left it: the next one
    assert [r.migration_id for r in reader.list()] == ["m1", "m2"]  # starts a segment


def test_history_reads_and_prunes_the_file_per_record_layout(tmp_path: Path) -> None:
    """Records of the layout before segments (one JSON file each) are shown and pruned."""
    import json

    (tmp_path / "history").mkdir()
    for i in range(3):
        rec = _rec(i)
        name = f"{int(rec.ended_unix * 1e9):020d}-source-{rec.migration_id}.json"
        (tmp_path / "history" / name).write_text(json.dumps(rec.to_dict()))
    h = History(tmp_path, limit=4)
    assert [r.migration_id for r in h.list()] == ["m0", "m1", "m2"]
    for i in range(3, 6):
        h.add(_rec(i))
    h.prune()
    assert [r.migration_id for r in h.list()] == ["m2", "m3", "m4", "m5"]
    assert sorted(p.suffix for p in (tmp_path / "history").iterdir()) == [".json", ".jsonl"]


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
