"""common.definitions: the indexed view of domains/ and how a store learns another one's
changes from the store lock's change log (common/storelock.py) instead of re-scanning."""

from __future__ import annotations

import os
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmmigrate.common import definitions
from vmmigrate.common.errors import DomainExists
from vmmigrate.common.store import HostStore
from vmmigrate.common.storelock import LOG_SLOTS

from tests.unit.test_store import U1, U2, U3, mkdef


@pytest.fixture
def rescans(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every full scan of domains/ (one stat per file), by directory."""
    seen: list[Path] = []
    real = definitions.Definitions._rescan

    def counted(self: definitions.Definitions) -> dict[str, definitions._Cached]:
        seen.append(self.directory)
        return real(self)

    monkeypatch.setattr(definitions.Definitions, "_rescan", counted)
    yield seen


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def names(store: HostStore) -> list[str]:
    return [d.name for d in store.list_domains()]


def test_another_store_changes_are_learnt_without_a_rescan(
    tmp_path: Path, rescans: list[Path]
) -> None:
    writer = HostStore(tmp_path)
    reader = HostStore(tmp_path)  # as the host's other daemon
    for i in range(30):
        writer.define(mkdef(f"vm{i:02d}", new_uuid()))
    assert len(names(reader)) == 30
    rescans.clear()
    writer.define(mkdef("web", U1))
    assert reader.lookup("web").uuid == U1
    assert reader.lookup(U1.upper()).name == "web"
    writer.define(mkdef("web", U1, description="v2"))
    assert reader.lookup("web").description == "v2"
    writer.undefine("vm05")
    assert reader.find("vm05") is None
    assert len(names(reader)) == 30
    with pytest.raises(DomainExists, match="already defined with uuid"):
        reader.define(mkdef("other", U1))
    assert rescans == []


def test_a_file_dropped_in_by_hand_between_two_changes_is_seen(tmp_path: Path) -> None:
    writer = HostStore(tmp_path)
    reader = HostStore(tmp_path)
    domains = tmp_path / "domains"
    writer.define(mkdef("a", U1))
    assert names(reader) == ["a"]
    (domains / f"{U2}.xml").write_text(mkdef("by-hand", U2).xml)
    later = time.time_ns() + 10_000_000  # another tick than the store's last change
    os.utime(domains, ns=(later, later))
    writer.define(mkdef("c", U3))
    assert names(reader) == ["a", "by-hand", "c"]


def test_a_long_absence_falls_back_to_a_rescan(tmp_path: Path, rescans: list[Path]) -> None:
    writer = HostStore(tmp_path)
    reader = HostStore(tmp_path)
    assert names(reader) == names(writer) == []
    rescans.clear()
    for _ in range(LOG_SLOTS // 2 + 1):  # more changes than the log keeps for a reader
        writer.define(mkdef("churn", U1))
    writer.undefine("churn")
    writer.define(mkdef("last", U2))
    assert names(reader) == ["last"]
    assert len(rescans) == 1


def test_an_unlogged_change_makes_readers_rescan(tmp_path: Path, rescans: list[Path]) -> None:
    writer = HostStore(tmp_path)
    reader = HostStore(tmp_path)
    writer.define(mkdef("a", U1))
    assert names(reader) == ["a"]
    rescans.clear()
    lock = writer._lock
    domains = tmp_path / "domains"
    with lock.held(), lock.changing(domains):  # a change that names no file
        (domains / f"{U2}.xml").write_text(mkdef("b", U2).xml)
    assert names(reader) == ["a", "b"]
    assert rescans == [domains]


def test_the_log_names_what_changed(tmp_path: Path) -> None:
    store = HostStore(tmp_path)
    lock = store._lock
    domains = tmp_path / "domains"
    store.list_domains()
    seen = store._defs._seen
    assert seen is not None
    store.define(mkdef("a", U1))
    store.define(mkdef("b", U2))
    store.undefine("a")
    st = os.stat(domains)
    now = (lock.read_generation(), st.st_ino, st.st_mtime_ns)
    assert lock.changes_since(seen, now) == [f"{U1}.xml", f"{U2}.xml"]
    assert lock.changes_since(now, now) == []
    # a directory that changed with no logged change: the log cannot tell
    assert lock.changes_since(now, (now[0], now[1], now[2] + 1)) is None
    assert lock.changes_since((seen[0] + 1, seen[1], seen[2]), now) is None


def test_duplicate_names_dropped_in_by_hand(tmp_path: Path) -> None:
    store = HostStore(tmp_path)
    domains = tmp_path / "domains"
    store.define(mkdef("twin", U1))
    (domains / f"{U2}.xml").write_text(mkdef("twin", U2).xml)
    assert sorted(d.uuid for d in store.list_domains()) == sorted([U1, U2])
    assert store.lookup("twin").uuid in (U1, U2)
    with pytest.raises(DomainExists, match="'twin' already exists"):
        store.define(mkdef("twin", U3))
    store.undefine(U1)
    assert store.lookup("twin").uuid == U2


def test_many_domains_one_lookup_reads_no_other_file(tmp_path: Path) -> None:
    writer = HostStore(tmp_path)
    reader = HostStore(tmp_path)
    for i in range(300):
        writer.define(mkdef(f"vm{i:03d}", new_uuid()))
    assert len(names(reader)) == 300
    calls: list[str] = []
    real_stat = os.stat

    def counting_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        calls.append(str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    writer.define(mkdef("new", U1))
    os_stat, os.stat = os.stat, counting_stat  # type: ignore[assignment]
    try:
        assert reader.lookup("new").uuid == U1
    finally:
        os.stat = os_stat  # type: ignore[assignment]
    assert len(calls) <= 3, calls  # the directory, and the one file the log names


def test_a_reader_does_not_wait_for_a_write_of_its_own_process(
    tmp_path: Path, rescans: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop looks definitions up while a thread of the same daemon writes one
    (its fsync may take long): it gets the view from before the write, at once, and no
    full scan."""
    store = HostStore(tmp_path)
    store.define(mkdef("a", U1))
    assert names(store) == ["a"]
    rescans.clear()
    entered, release = threading.Event(), threading.Event()
    real_write = definitions.atomic_write

    def slow_write(*args: Any, **kwargs: Any) -> None:
        entered.set()
        assert release.wait(10)
        real_write(*args, **kwargs)

    monkeypatch.setattr(definitions, "atomic_write", slow_write)
    writer = threading.Thread(target=store.define, args=(mkdef("b", U2),))
    writer.start()
    try:
        assert entered.wait(10)
        t0 = time.monotonic()
        assert store.lookup("a").uuid == U1
        assert store.find("b") is None  # not written yet
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        writer.join(10)
    assert store.lookup("b").uuid == U2
    assert rescans == []


def test_another_process_write_under_way_is_not_waited_for_nor_rescanned(
    tmp_path: Path, rescans: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change by the host's other daemon is under way (the generation is odd): a reader
    keeps its view (the change has not completed) instead of re-reading every file, and
    takes the change in once it has completed."""
    writer = HostStore(tmp_path)
    reader = HostStore(tmp_path)  # as the other daemon: a view and a lock file of its own
    writer.define(mkdef("a", U1))
    assert names(reader) == names(writer) == ["a"]
    rescans.clear()
    entered, release = threading.Event(), threading.Event()
    real_write = definitions.atomic_write

    def slow_write(*args: Any, **kwargs: Any) -> None:
        entered.set()
        assert release.wait(10)
        real_write(*args, **kwargs)

    monkeypatch.setattr(definitions, "atomic_write", slow_write)
    thread = threading.Thread(target=writer.define, args=(mkdef("b", U2),))
    thread.start()
    try:
        assert entered.wait(10)
        assert reader._lock.read_generation() % 2 == 1
        assert names(reader) == ["a"]
    finally:
        release.set()
        thread.join(10)
    assert names(reader) == ["a", "b"]
    assert rescans == []


def test_a_restart_closes_a_change_its_dead_writer_left_half_done(tmp_path: Path) -> None:
    """A daemon killed in the middle of a change (a group commit cut between its renames)
    leaves the counter odd; the daemon's restart, holding the store lock, closes it, and the
    host's other daemon sees the renamed files at its next look, not after its grace for
    a live writer."""
    other = HostStore(tmp_path)
    dead = HostStore(tmp_path)
    dead.define(mkdef("before", U1))
    assert names(other) == ["before"]
    lock = dead._lock
    with lock.held():
        lock.write_generation(lock.read_generation() + 1)  # the change began...
        (tmp_path / "domains" / f"{U2}.xml").write_text(mkdef("renamed", U2).xml)
    dead.close()  # ...and its writer died
    assert other._lock.read_generation() % 2 == 1
    restarted = HostStore(tmp_path)
    assert restarted._lock.read_generation() % 2 == 0
    assert names(other) == ["before", "renamed"]
