"""The incoming-reservation index (common/incomingindex.py): a store's conflict checks scan
jobs/ only when another process changed the reservations (or a writer died half-way), and
never miss a reservation another store (another daemon of the host) made or dropped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmmigrate.common.errors import JobActive
from vmmigrate.common.store import HostStore, JobRecord

from tests.unit.test_store import U1, U2, U3, incoming, mkdef


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[HostStore, HostStore]]:
    """Two stores on one state directory: srcd's and dstd's of one host."""
    a, b = HostStore(tmp_path / "state"), HostStore(tmp_path / "state")
    yield a, b
    a.close()
    b.close()


def _scans(s: HostStore) -> int:
    return s._incoming.index.scans


def test_own_changes_keep_the_index_current(two: tuple[HostStore, HostStore]) -> None:
    a, _ = two
    a.define(mkdef("d1", U1))
    a.reserve_incoming(incoming("m1", "vm1", U2))
    a.define(mkdef("d3", U3))  # the counter was never written before m1: one scan after it
    first = _scans(a)
    for i in range(20):
        a.reserve_incoming(incoming(f"m-{i}", f"vm-{i}", f"{i:08x}-0000-4000-8000-000000000000"))
        a.release_incoming(f"m-{i}")
    with pytest.raises(JobActive):
        a.define(mkdef("vm1", U2))  # still reserved: seen without a scan
    a.release_incoming("m1")
    a.define(mkdef("vm1", U2))
    assert _scans(a) == first


def test_another_process_change_is_seen(two: tuple[HostStore, HostStore]) -> None:
    a, b = two
    a.define(mkdef("d1", U1))  # a's index now current
    a.define(mkdef("d3", U3))
    before = _scans(a)
    b.reserve_incoming(incoming("m2", "vm2", U2))  # the other store reserves
    with pytest.raises(JobActive):
        a.define(mkdef("vm2", U2))
    assert _scans(a) == before + 1
    b.release_incoming("m2")
    a.define(mkdef("vm2", U2))  # and sees it dropped
    # a source record (journal_put) changes no reservation: no scan for it
    now = _scans(a)
    b.journal_put(JobRecord(migration_id="s1", role="source", domain_name="d1",
                            domain_uuid=U1, phase="begin3", flags=1024, peer="x:1"))
    a.define(mkdef("d4", "c1a2a3a4-b1b2-4c1c-8d1d-e1e2e3e4e5e6"))
    assert _scans(a) == now


def test_a_writer_that_died_half_way_means_a_scan_each_time(
    two: tuple[HostStore, HostStore],
) -> None:
    a, b = two
    a.define(mkdef("d1", U1))
    lock = b._lock
    g = lock.read_journal_generation()
    lock.write_journal_generation(g + 1 if g % 2 == 0 else g)  # odd: left by a dead writer
    before = _scans(a)
    a.define(mkdef("d2", U2))
    a.define(mkdef("d3", U3))
    assert _scans(a) == before + 2
    b.reserve_incoming(incoming("m9", "vm9", "d1a2a3a4-b1b2-4c1c-8d1d-e1e2e3e4e5e6"))
    with pytest.raises(JobActive):
        a.define(mkdef("vm9", "d1a2a3a4-b1b2-4c1c-8d1d-e1e2e3e4e5e6"))


def test_holder_by_name_or_any_spelling_of_the_uuid(two: tuple[HostStore, HostStore]) -> None:
    a, b = two
    b.reserve_incoming(incoming("m5", "vm5", U2))
    idx = a._incoming.index
    with a._lock.held():
        assert idx.holder("vm5", U3, None) is not None  # by name
        got = idx.holder(None, U2.upper().replace("-", ""), None)  # by UUID, any spelling
        assert got is not None and got.migration_id == "m5"
        assert idx.holder("vm5", U2, "m5") is None  # its own migration is not a holder
        assert idx.holder("other", U1, None) is None
    a.release_incoming("m5")  # released through the other store: gone from both views
    with a._lock.held():
        assert idx.holder("vm5", U2, None) is None
    with b._lock.held():  # (one at a time: the two stores share one lock file)
        assert b._incoming.index.holder("vm5", U2, None) is None
