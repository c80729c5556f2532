"""Group commit: the committer (common/groupcommit.py), the many-file durable write
(common/durable.py atomic_write_many) and the store's batch writes built on them (incoming
definitions, outcomes, undefines): each item gets its own result or its own error, and a
group is written with one flush."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from vmmigrate.common import durable
from vmmigrate.common.durable import TEMP_PREFIX, atomic_write_many
from vmmigrate.common.errors import InvalidArgument, StorageError
from vmmigrate.common.groupcommit import GroupCommit
from vmmigrate.common.store import OUTCOME_FINISHED, HostStore, MigrationOutcome

from tests.unit.test_store import U1, U2, U3, incoming, mkdef


def test_a_lone_item_is_flushed_at_once_alone() -> None:
    groups: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int | BaseException]:
        groups.append(list(items))
        return [i * 10 for i in items]

    async def go() -> int:
        return await GroupCommit(run).submit(4)

    assert asyncio.run(go()) == 40
    assert groups == [[4]]


def test_items_that_arrive_during_a_flush_go_together_in_the_next() -> None:
    groups: list[list[int]] = []
    release = threading.Event()

    def run(items: Sequence[int]) -> list[int | BaseException]:
        groups.append(list(items))
        if items[0] == 0:
            release.wait(5)  # the first flush is slow: the others queue meanwhile
        return [i * 10 for i in items]

    async def go() -> list[int]:
        gc = GroupCommit(run)
        first = asyncio.ensure_future(gc.submit(0))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(gc.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        release.set()
        return [await first, *await asyncio.gather(*rest)]

    assert asyncio.run(go()) == [0, 10, 20, 30, 40, 50]
    assert groups == [[0], [1, 2, 3, 4, 5]]


def test_each_item_gets_its_own_error_and_a_crash_of_run_is_everyones() -> None:
    def run(items: Sequence[int]) -> list[int | BaseException]:
        if 99 in items:
            raise OSError("disk gone")
        return [ValueError(f"bad {i}") if i % 2 else i for i in items]

    async def go() -> list[object]:
        gc = GroupCommit(run)
        got = await asyncio.gather(*(gc.submit(i) for i in range(4)), return_exceptions=True)
        again = await asyncio.gather(gc.submit(99), gc.submit(2), return_exceptions=True)
        return [*got, *again]

    got = asyncio.run(go())
    assert got[0] == 0 and got[2] == 2
    assert isinstance(got[1], ValueError) and str(got[1]) == "bad 1"
    assert isinstance(got[3], ValueError)
    assert all(isinstance(g, OSError) for g in got[4:])


def test_inline_runs_a_lone_item_in_the_callers_thread_only_when_told_and_free() -> None:
    """``inline``: a lone item with no flush running is written on the event loop's own
    thread (no hand-off) while the predicate says so; otherwise it goes to a worker thread,
    and items that queue behind a running flush still go together."""
    threads: list[tuple[list[int], int]] = []
    release = threading.Event()
    alone = [True]

    def run(items: Sequence[int]) -> list[int | BaseException]:
        threads.append((list(items), threading.get_ident()))
        if items[0] == 0:
            release.wait(5)
        if 7 in items:
            raise OSError("disk gone")
        return [ValueError("bad") if i == 5 else i * 10 for i in items]

    async def go() -> tuple[int, object, object, list[int]]:
        gc = GroupCommit(run, inline=lambda: alone[0])
        one = await gc.submit(1)  # alone, nothing running: inline
        errs = await asyncio.gather(gc.submit(5), return_exceptions=True)  # its own error
        crash = await asyncio.gather(gc.submit(7), return_exceptions=True)
        alone[0] = False
        slow = asyncio.ensure_future(gc.submit(0))  # not alone: a worker thread
        await asyncio.sleep(0.01)
        alone[0] = True
        rest = [asyncio.ensure_future(gc.submit(i)) for i in (2, 3)]  # a flush runs: queued
        await asyncio.sleep(0.01)
        release.set()
        return one, errs[0], crash[0], [await slow, *await asyncio.gather(*rest)]

    loop_thread = threading.get_ident()
    one, err, crash, later = asyncio.run(go())
    assert one == 10 and later == [0, 20, 30]
    assert isinstance(err, ValueError) and isinstance(crash, OSError)
    assert [items for items, _ in threads] == [[1], [5], [7], [0], [2, 3]]
    assert [t == loop_thread for _, t in threads] == [True, True, True, False, False]


def _temps(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith(TEMP_PREFIX)]


def test_atomic_write_many_writes_all_with_one_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real = durable._sync_filesystem
    monkeypatch.setattr(durable, "_sync_filesystem", lambda fds: syncs.append(len(fds)) or real(fds))
    (tmp_path / "b").write_bytes(b"old")
    renamed: list[int] = []
    items = [(tmp_path / n, n.encode() * 3, None) for n in ("a", "b", "c")]
    atomic_write_many(items, after_rename=renamed.append)
    assert [(tmp_path / n).read_bytes() for n in "abc"] == [b"aaa", b"bbb", b"ccc"]
    assert syncs == [3]  # one flush for the three
    assert renamed == [0, 1, 2]
    assert _temps(tmp_path) == []


def test_atomic_write_many_fails_whole_and_touches_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"old")
    items = [(tmp_path / "a", b"new", None), (tmp_path / "nodir" / "b", b"new", None)]
    with pytest.raises(StorageError, match="cannot write"):
        atomic_write_many(items)
    assert (tmp_path / "a").read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_atomic_write_many_falls_back_to_fsync_without_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "_libc_syncfs", lambda: None)
    fsyncs: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real(fd))
    atomic_write_many([(tmp_path / n, b"x", None) for n in ("a", "b")])
    assert (tmp_path / "a").read_bytes() == b"x" == (tmp_path / "b").read_bytes()
    assert len(fsyncs) == 3  # each file, then the directory once


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HostStore]:
    s = HostStore(tmp_path / "state")
    yield s
    s.close()


def test_persist_incoming_many_answers_per_item(store: HostStore) -> None:
    store.define(mkdef("taken", U3))
    store.reserve_incoming(incoming("m1", "vm1", U1))
    store.reserve_incoming(incoming("m2", "vm2", U2))
    got = store.persist_incoming_many(
        [("m1", mkdef("vm1", U1)), ("nope", mkdef("vm3", U3)), ("m2", mkdef("vm2", U2))]
    )
    assert got[0] == (None, False) and got[2] == (None, False)
    assert isinstance(got[1], Exception) and "no incoming migration" in str(got[1])
    assert sorted(d.name for d in store.list_domains()) == ["taken", "vm1", "vm2"]
    # a clash is that item's error only
    store.reserve_incoming(incoming("m4", "vm4", "c1c2c3c4-b1b2-4c1c-8d1d-e1e2e3e4e5e6"))
    clash = store.persist_incoming_many([("m4", mkdef("taken", "c1c2c3c4-b1b2-4c1c-8d1d-e1e2e3e4e5e6"))])
    assert isinstance(clash[0], Exception)


def test_persist_incoming_many_returns_what_it_replaced(store: HostStore) -> None:
    old = mkdef("vm1", U1, description="old")
    store.define(old)
    store.reserve_incoming(incoming("m1", "vm1", U1))
    got = store.persist_incoming_many([("m1", mkdef("vm1", U1, description="new"))])
    assert isinstance(got[0], tuple) and got[0][1] is True
    assert got[0][0] is not None and got[0][0].xml == old.xml
    assert store.lookup("vm1").xml == mkdef("vm1", U1, description="new").xml


def test_outcome_put_many(store: HostStore) -> None:
    outcomes = [
        MigrationOutcome(migration_id=f"m{i}", outcome=OUTCOME_FINISHED, domain_name=f"vm{i}")
        for i in range(3)
    ]
    bad = MigrationOutcome(migration_id="../x", outcome=OUTCOME_FINISHED)
    got = store.outcome_put_many([*outcomes, bad])
    assert got[:3] == [None, None, None] and isinstance(got[3], InvalidArgument)
    for i in range(3):
        o = store.outcome_get(f"m{i}")
        assert o is not None and o.domain_name == f"vm{i}"


def test_undefine_many(store: HostStore) -> None:
    for name, u in (("vm1", U1), ("vm2", U2), ("vm3", U3)):
        store.define(mkdef(name, u))
    got = store.undefine_many([("vm1", None), ("missing", None), (U2, None)])
    assert [getattr(g, "name", None) for g in got] == ["vm1", None, "vm2"]
    assert "no domain with matching name 'missing'" in str(got[1])
    assert [d.name for d in store.list_domains()] == ["vm3"]
    with pytest.raises(Exception, match="no domain"):
        store.undefine("vm1")


def test_journal_listing_reuses_unchanged_records_and_sees_every_rewrite(
    store: HostStore,
) -> None:
    import dataclasses

    rec = incoming("m1", "vm1", U1)
    store.journal_put(rec, durable=False)
    store.journal_put(incoming("m2", "vm2", U2), durable=False)
    assert sorted(r.migration_id for r in store.journal_list()) == ["m1", "m2"]
    for phase in ("finish3", "confirm3", "prepare", "finish3"):  # rewritten quickly
        store.journal_put(dataclasses.replace(rec, phase=phase), durable=False)
        got = {r.migration_id: r for r in store.journal_list()}
        assert got["m1"].phase == phase
    store.journal_remove("m2", durable=False)
    assert [r.migration_id for r in store.journal_list()] == ["m1"]
