"""common.store: the host store, its conflict rules, its locks, and concurrent writers."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from structlog.testing import capture_logs
from vmmigrate.common import definitions
from vmmigrate.common.domainxml import DomainDef, parse_domain, rename
from vmmigrate.common.errors import (
    DomainExists,
    InvalidArgument,
    JobActive,
    NoDomain,
    OperationInvalid,
    StorageError,
    StorageFull,
    VmmigrateError,
    XMLError,
)
from vmmigrate.common.store import HostStore, JobLock, JobRecord, validate_migration_id

HERE = Path(__file__).resolve().parent

U1 = "6f2b1d9e-8c3a-4a7b-9d2e-1f0a5b6c7d8e"
U2 = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
U3 = "a1a2a3a4-b1b2-4c1c-8d1d-e1e2e3e4e5e6"


def mkdef(name: str, uuid: str | None = None, description: str = "", extra: str = "") -> DomainDef:
    u = f"<uuid>{uuid}</uuid>" if uuid else ""
    desc = f"<description>{escape(description)}</description>" if description else ""
    return parse_domain(
        f"<domain type='kvm'>\n  <name>{escape(name)}</name>\n  {u}{desc}\n"
        f"  <memory unit='MiB'>64</memory>{extra}\n</domain>\n"
    )


def incoming(mid: str, name: str, uuid: str) -> JobRecord:
    return JobRecord(
        migration_id=mid,
        role="destination",
        domain_name=name,
        domain_uuid=uuid,
        phase="prepare",
        flags=1024 | 8,
        peer="127.0.0.2:7302",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HostStore]:
    s = HostStore(tmp_path / "state")
    yield s
    s.close()


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# ---------------------------------------------------------------- identity and layout


def test_layout_is_created(tmp_path: Path) -> None:
    s = HostStore(tmp_path / "state")
    for sub in ("domains", "jobs", "locks"):
        assert (tmp_path / "state" / sub).is_dir()
    assert (tmp_path / "state" / "host.json").is_file()
    assert s.state_dir == tmp_path / "state"
    s.close()
    s.close()
    with pytest.raises(StorageError, match="is closed"):
        s.define(mkdef("web", U1))


def test_identity_is_persisted_and_stable(tmp_path: Path) -> None:
    a = HostStore(tmp_path)
    b = HostStore(tmp_path)
    assert a.identity.host_uuid == b.identity.host_uuid
    assert str(uuidlib.UUID(a.identity.host_uuid)) == a.identity.host_uuid
    on_disk = json.loads((tmp_path / "host.json").read_text())
    assert on_disk["host_uuid"] == a.identity.host_uuid
    assert a.identity.hostname == socket.gethostname()
    assert HostStore(tmp_path, hostname="node-7").identity.hostname == "node-7"


def test_identity_override_is_not_persisted(tmp_path: Path) -> None:
    s = HostStore(tmp_path, host_uuid="0B1C2D3E4F5046178293A4B5C6D7E8F9")
    assert s.identity.host_uuid == U2
    assert not (tmp_path / "host.json").exists() or U2 not in (tmp_path / "host.json").read_text()
    plain = HostStore(tmp_path)
    assert plain.identity.host_uuid != U2
    assert HostStore(tmp_path, host_uuid=U2).identity.host_uuid == U2
    assert HostStore(tmp_path).identity.host_uuid == plain.identity.host_uuid


@pytest.mark.parametrize("bad", ["not-a-uuid", "00000000-0000-0000-0000-000000000000", ""])
def test_invalid_host_uuid_override(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid host uuid"):
        HostStore(tmp_path, host_uuid=bad)


def test_unreadable_host_json_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    HostStore(tmp_path)
    (tmp_path / "host.json").write_text("{garbage")
    with pytest.raises(StorageError, match=r"host\.json: no valid host_uuid"):
        HostStore(tmp_path)


def test_first_start_race_yields_one_identity(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: HostStore(tmp_path).identity.host_uuid, range(16)))
    assert len(ids) == 1


def test_leftover_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    HostStore(tmp_path)
    for sub in ("", "domains", "jobs"):
        (tmp_path / sub / ".tmp-leftover.123").write_bytes(b"half a file")
    HostStore(tmp_path)
    assert [p for p in all_files(tmp_path) if p.name.startswith(".tmp-")] == []


# ---------------------------------------------------------------- definitions


def test_define_list_find_lookup(store: HostStore) -> None:
    b = mkdef("beta", U2)
    a = mkdef("alpha", U1)
    assert store.define(b) is False
    assert store.define(a) is False
    assert [d.name for d in store.list_domains()] == ["alpha", "beta"]
    assert store.list_domains() == [a, b]
    assert store.lookup("alpha") == a
    assert store.lookup(U1.upper()) == a
    assert store.lookup(U1.replace("-", "")) == a
    assert store.find("gamma") is None
    path = store.state_dir / "domains" / f"{U1}.xml"
    assert path.read_text() == a.xml


def test_lookup_errors(store: HostStore) -> None:
    with pytest.raises(NoDomain) as info:
        store.lookup("ghost")
    assert str(info.value) == "Domain not found: no domain with matching name 'ghost'"
    with pytest.raises(NoDomain) as info:
        store.lookup(U3)
    assert str(info.value) == f"Domain not found: no domain with matching uuid '{U3}'"


def test_name_wins_over_uuid(store: HostStore) -> None:
    by_uuid = mkdef("target", U1)
    named_like_uuid = mkdef(U1, U2)
    store.define(by_uuid)
    store.define(named_like_uuid)
    assert store.lookup(U1) == named_like_uuid
    assert store.lookup(U1.upper()) == by_uuid


def test_redefine_replaces(store: HostStore, tmp_path: Path) -> None:
    store.define(mkdef("web", U1, description="v1"))
    other = HostStore(tmp_path / "state")
    assert other.lookup("web").description == "v1"
    assert store.define(mkdef("web", U1, description="v2")) is True
    assert other.lookup("web").description == "v2"
    assert len(other.list_domains()) == 1


def test_same_name_other_uuid_is_refused(store: HostStore) -> None:
    store.define(mkdef("web", U1))
    with pytest.raises(DomainExists) as info:
        store.define(mkdef("web", U2))
    assert str(info.value) == f"domain 'web' already exists with uuid {U1}"
    assert [d.uuid for d in store.list_domains()] == [U1]


def test_same_uuid_other_name_is_refused(store: HostStore) -> None:
    store.define(mkdef("web", U1))
    with pytest.raises(DomainExists) as info:
        store.define(mkdef("db", U1))
    assert str(info.value) == f"domain 'web' is already defined with uuid {U1}"
    assert [d.name for d in store.list_domains()] == ["web"]


def test_undefine(store: HostStore) -> None:
    a = mkdef("web", U1)
    store.define(a)
    assert store.undefine("web") == a
    assert store.list_domains() == []
    assert not (store.state_dir / "domains" / f"{U1}.xml").exists()
    with pytest.raises(NoDomain, match="no domain with matching name 'web'"):
        store.undefine("web")
    store.define(a)
    assert store.undefine(U1.upper()) == a


@pytest.mark.parametrize(
    "name", ["a..b", "vm-ünï-雪", "..x", "con", "a b", "x&<y>'\"", "-rf", "name.xml", U3]
)
def test_odd_names_are_stored_under_their_uuid(store: HostStore, name: str) -> None:
    d = mkdef(name, U1)
    store.define(d)
    assert sorted(p.name for p in (store.state_dir / "domains").iterdir()) == [f"{U1}.xml"]
    assert store.lookup(name) == d
    assert store.undefine(name) == d


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", ".", "a/b"])
def test_path_like_names_never_get_defined(name: str) -> None:
    with pytest.raises(XMLError):
        mkdef(name, U1)


def test_definition_must_match_its_xml(store: HostStore) -> None:
    d = mkdef("web", U1)
    with pytest.raises(InvalidArgument, match="does not match its XML"):
        store.define(dataclasses.replace(d, name="other"))
    with pytest.raises(InvalidArgument, match="does not match its XML"):
        store.define(dataclasses.replace(d, uuid=U2))
    assert store.list_domains() == []


def test_oversized_definition_is_refused(tmp_path: Path) -> None:
    s = HostStore(tmp_path, max_xml_bytes=2048)
    with pytest.raises(XMLError, match="too large"):
        s.define(mkdef("big", U1, description="x" * 4096))
    assert s.list_domains() == []


def test_define_logs_an_event(store: HostStore) -> None:
    with capture_logs() as logs:
        store.define(mkdef("web", U1))
        store.undefine("web")
    events = [(e["event"], e.get("name"), e.get("uuid")) for e in logs]
    assert ("domain_defined", "web", U1) in events
    assert ("domain_undefined", "web", U1) in events


def test_unreadable_files_are_skipped_and_reported_once(store: HostStore) -> None:
    good = mkdef("good", U1)
    store.define(good)
    domains = store.state_dir / "domains"
    (domains / f"{U2}.xml").write_text("<domain type='kvm'><name>broken")
    (domains / f"{U3}.xml").write_text(mkdef("liar", U1).xml)  # uuid != file name
    (domains / "c0ffee00-0000-4000-8000-000000000001.xml").symlink_to("/etc/passwd")
    (domains / "notes.txt").write_text("ignored: not a definition file")
    with capture_logs() as logs:
        assert store.list_domains() == [good]
        assert store.list_domains() == [good]
    unreadable = [e for e in logs if e["event"] == "store_file_unreadable"]
    assert len(unreadable) == 3
    assert all(e["log_level"] == "warning" for e in unreadable)


def test_unchanged_files_are_not_parsed_again(store: HostStore, tmp_path: Path) -> None:
    for i in range(20):
        store.define(mkdef(f"vm{i:02d}", str(uuidlib.uuid4())))
    fresh = HostStore(tmp_path / "state")
    first = fresh.list_domains()
    second = fresh.list_domains()
    assert all(a is b for a, b in zip(first, second, strict=True))


def test_cache_sees_every_rewrite(tmp_path: Path) -> None:
    """Freed inodes are reused at once: a same-size rewrite must still be seen."""
    reader = HostStore(tmp_path)
    writer = HostStore(tmp_path)
    for i in range(60):
        name = f"vm{i % 10}"
        writer.define(mkdef(name, U1))
        assert reader.lookup(U1).name == name
        writer.undefine(U1)
        assert reader.find(U1) is None


def test_directory_changes_within_one_timestamp_tick_are_seen(tmp_path: Path) -> None:
    """With coarse timestamps, two changes of domains/ can share one mtime."""
    reader = HostStore(tmp_path)
    writer = HostStore(tmp_path)
    domains = tmp_path / "domains"
    tick = time.time_ns()
    os.utime(domains, ns=(tick, tick))
    assert reader.list_domains() == []
    writer.define(mkdef("web", U1))
    os.utime(domains, ns=(tick, tick))  # the same tick as the listing above
    assert [d.name for d in reader.list_domains()] == ["web"]
    writer.undefine("web")
    os.utime(domains, ns=(tick, tick))
    assert reader.list_domains() == []


def test_writer_dying_mid_change_leaves_readers_rescanning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = HostStore(tmp_path)
    domains = tmp_path / "domains"
    counter = tmp_path / "locks" / "store.lock"
    assert reader.list_domains() == []
    before = os.stat(domains)
    generation = int.from_bytes(counter.read_bytes()[:8], "little")
    assert generation % 2 == 0

    def same_directory_mtime() -> None:  # as on a file system with coarse timestamps
        os.utime(domains, ns=(before.st_atime_ns, before.st_mtime_ns))

    # A writer marks the change as under way, renames its file into place, and dies.
    with open(counter, "r+b") as f:
        f.write((generation + 1).to_bytes(8, "little"))
    (domains / f"{U1}.xml").write_text(mkdef("web", U1).xml)
    same_directory_mtime()
    # At first the change counts as under way (a live writer takes milliseconds): the
    # reader keeps its view; past the grace it is taken as left half-done: re-scans.
    assert reader.list_domains() == []
    monkeypatch.setattr(definitions, "ODD_GRACE", 0.0)
    assert [d.name for d in reader.list_domains()] == ["web"]
    (domains / f"{U1}.xml").unlink()
    same_directory_mtime()
    assert reader.list_domains() == []
    # The next writer settles the generation; everyone sees its change.
    HostStore(tmp_path).define(mkdef("db", U2))
    assert int.from_bytes(counter.read_bytes()[:8], "little") % 2 == 0
    assert [d.name for d in reader.list_domains()] == ["db"]


def test_storage_full_leaves_the_store_consistent(tiny_fs: Path) -> None:
    s = HostStore(tiny_fs)
    small = mkdef("small", U1)
    s.define(small)
    with pytest.raises(StorageFull, match="No space left on device"):
        s.define(mkdef("big", U2, description="x" * 200_000))
    with pytest.raises(StorageFull):
        s.define(mkdef("small", U1, description="y" * 200_000))
    assert s.list_domains() == [small]
    assert [p for p in all_files(tiny_fs) if p.name.startswith(".tmp-")] == []
    s.close()


# ---------------------------------------------------------------- source job lock

HOLDER = """
import sys
import logging
import structlog
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)
from pathlib import Path
from vmmigrate.common.domainxml import parse_domain
from vmmigrate.common.store import HostStore
s = HostStore(Path(sys.argv[1]))
d = parse_domain(sys.argv[2])
lock = s.acquire_job(d)
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


@pytest.fixture
def holder(store: HostStore) -> Iterator[tuple[subprocess.Popen[str], DomainDef]]:
    """Another process holding the job lock on 'web'."""
    d = mkdef("web", U1)
    store.define(d)
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.state_dir), d.xml],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "held"
        yield p, d
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_job_lock_in_process(store: HostStore, tmp_path: Path) -> None:
    d = mkdef("web", U1)
    store.define(d)
    lock = store.acquire_job(d)
    assert isinstance(lock, JobLock)
    assert store.job_held(U1)
    assert store.job_held(U1.upper())
    with pytest.raises(JobActive) as info:
        store.acquire_job(d)
    assert str(info.value) == "another migration job is already running for domain 'web'"
    other = HostStore(tmp_path / "state")
    with pytest.raises(JobActive):
        other.acquire_job(d)
    assert other.job_held(U1)
    lock.release()
    lock.release()  # idempotent
    assert not store.job_held(U1)
    assert not other.job_held(U1)
    with other.acquire_job(d) as again:
        assert store.job_held(U1)
        assert again.held
    assert not store.job_held(U1)
    # the lock file stays for the next job (no inode to allocate then), unlocked
    locks = store.state_dir / "locks"
    assert sorted(p.name for p in locks.iterdir()) == [f"{U1}.job", "store.lock"]
    with store.acquire_job(d):
        assert store.sweep_job_locks() == 0  # a held one stays
    assert store.sweep_job_locks() == 0  # so does a defined domain's
    store.undefine("web")
    assert store.sweep_job_locks(frozenset({U1})) == 0  # and one in ``keep`` (running)
    assert store.sweep_job_locks() == 1  # web is not defined here any more: its file goes
    assert sorted(p.name for p in locks.iterdir()) == ["store.lock"]
    store.acquire_job(d).release()  # and comes back with its next job


def test_job_lock_sweep_keeps_defined_domains(store: HostStore) -> None:
    web, db = mkdef("web", U1), mkdef("db", U2)
    store.define(web)
    for d in (web, db):
        store.acquire_job(d).release()
    assert store.sweep_job_locks() == 1
    assert sorted(p.name for p in (store.state_dir / "locks").iterdir()) == [
        f"{U1}.job",
        "store.lock",
    ]
    with store.acquire_job(web):  # a kept file works as before
        assert store.job_held(U1)
    assert not store.job_held(U1)


def test_job_lock_threads_race(store: HostStore) -> None:
    d = mkdef("web", U1)
    barrier = threading.Barrier(16)

    def attempt(_: int) -> JobLock | None:
        barrier.wait()
        try:
            return store.acquire_job(d)
        except JobActive:
            return None

    with ThreadPoolExecutor(16) as pool:
        got = [g for g in pool.map(attempt, range(16)) if g is not None]
    assert len(got) == 1
    got[0].release()


def test_define_and_undefine_refused_while_job_held(store: HostStore) -> None:
    d = mkdef("web", U1)
    store.define(d)
    with store.acquire_job(d):
        with pytest.raises(JobActive) as info:
            store.define(mkdef("web", U1, description="new"))
        assert str(info.value) == "another migration job is already running for domain 'web'"
        with pytest.raises(JobActive) as info:
            store.undefine("web")
        assert str(info.value) == "cannot undefine domain 'web': a migration job is running"
        # other domains are not affected
        store.define(mkdef("db", U2))
    assert store.lookup("web") == d
    store.undefine("web")


def test_job_holder_may_undefine(store: HostStore, tmp_path: Path) -> None:
    """Confirm with UNDEFINE_SOURCE removes the definition inside the job."""
    web, db = mkdef("web", U1), mkdef("db", U2)
    store.define(web)
    store.define(db)
    with store.acquire_job(web) as lock, store.acquire_job(db) as other_lock:
        with pytest.raises(JobActive):
            store.undefine("web", other_lock)  # a lock on another domain does not count
        with pytest.raises(JobActive):
            HostStore(tmp_path / "state").undefine("web", lock)  # nor another store's
        assert store.undefine(U1, lock) == web
        assert [d.name for d in store.list_domains()] == ["db"]
    assert not other_lock.held
    assert store.undefine("db", other_lock) == db  # a released lock is simply ignored
    assert store.list_domains() == []


def test_job_lock_across_processes(
    store: HostStore, holder: tuple[subprocess.Popen[str], DomainDef]
) -> None:
    p, d = holder
    assert store.job_held(U1)
    with pytest.raises(JobActive, match="another migration job is already running for domain"):
        store.acquire_job(d)
    with pytest.raises(JobActive, match="another migration job is already running"):
        store.define(mkdef("web", U1, description="changed"))
    with pytest.raises(JobActive, match="cannot undefine domain 'web'"):
        store.undefine("web")
    with pytest.raises(JobActive):
        store.reserve_incoming(incoming("m1", "web", U1))
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "released"
    assert not store.job_held(U1)
    store.acquire_job(d).release()


def test_job_lock_of_a_dead_process_is_free(
    store: HostStore, holder: tuple[subprocess.Popen[str], DomainDef]
) -> None:
    p, d = holder
    assert store.job_held(U1)
    p.kill()
    p.wait()
    assert not store.job_held(U1)
    # the kernel dropped the lock with its holder; the file stays (web is defined here)
    assert store.sweep_job_locks() == 0
    assert sorted(x.name for x in (store.state_dir / "locks").iterdir()) == [
        f"{U1}.job",
        "store.lock",
    ]
    with store.acquire_job(d):
        assert store.job_held(U1)


# ---------------------------------------------------------------- incoming migrations


def test_reservation_creates_no_definition(store: HostStore) -> None:
    assert store.reserve_incoming(incoming("m1", "web", U1.upper())) is False
    assert store.list_domains() == []
    rec = store.journal_get("m1")
    assert rec is not None
    assert (rec.role, rec.domain_name, rec.domain_uuid, rec.phase) == (
        "destination",
        "web",
        U1,
        "prepare",
    )


def test_reservation_accepts_same_definition(store: HostStore) -> None:
    store.define(mkdef("web", U1))
    assert store.reserve_incoming(incoming("m1", "web", U1)) is True


def test_reservation_clashes_with_definitions(store: HostStore) -> None:
    store.define(mkdef("web", U1))
    with pytest.raises(DomainExists) as info:
        store.reserve_incoming(incoming("m1", "web", U2))
    assert str(info.value) == f"domain 'web' already exists with uuid {U1}"
    with pytest.raises(DomainExists) as info:
        store.reserve_incoming(incoming("m1", "db", U1))
    assert str(info.value) == f"domain 'web' is already defined with uuid {U1}"
    assert store.journal_list() == []


def test_second_reservation_is_refused(store: HostStore) -> None:
    store.reserve_incoming(incoming("m1", "web", U1))
    for name, uuid in (("web", U2), ("other", U1), ("web", U1)):
        with pytest.raises(JobActive) as info:
            store.reserve_incoming(incoming("m2", name, uuid))
        assert str(info.value) == f"another migration job is already running for domain '{name}'"
    assert [r.migration_id for r in store.journal_list()] == ["m1"]


def test_reservation_retry_and_misuse(store: HostStore) -> None:
    store.reserve_incoming(incoming("m1", "web", U1))
    first = store.journal_get("m1")
    assert first is not None
    store.reserve_incoming(incoming("m1", "web", U1))  # a retried Prepare
    again = store.journal_get("m1")
    assert again is not None and again.started_unix == first.started_unix
    with pytest.raises(OperationInvalid, match="migration id 'm1' is already in use"):
        store.reserve_incoming(incoming("m1", "db", U2))
    with pytest.raises(InvalidArgument, match="role 'destination'"):
        store.reserve_incoming(dataclasses.replace(incoming("m2", "db", U2), role="source"))
    with pytest.raises(InvalidArgument, match="invalid migration id"):
        store.reserve_incoming(incoming("../m", "db", U2))


def test_define_refused_while_reserved(store: HostStore) -> None:
    store.reserve_incoming(incoming("m1", "web", U1))
    with pytest.raises(JobActive) as info:
        store.define(mkdef("web", U2))
    assert str(info.value) == "domain 'web' is being migrated to this host"
    with pytest.raises(JobActive) as info:
        store.define(mkdef("db", U1))
    assert str(info.value) == "domain 'web' is being migrated to this host"
    store.define(mkdef("db", U2))
    with pytest.raises(JobActive, match="another migration job is already running"):
        store.acquire_job(mkdef("web", U1))


def test_undefine_refused_while_incoming_will_replace(store: HostStore) -> None:
    store.define(mkdef("web", U1))
    store.reserve_incoming(incoming("m1", "web", U1))
    with pytest.raises(JobActive, match="cannot undefine domain 'web'"):
        store.undefine("web")


def test_persist_incoming(store: HostStore) -> None:
    store.reserve_incoming(incoming("m1", "web", U1))
    d = mkdef("web", U1, description="arrived")
    with capture_logs() as logs:
        assert store.persist_incoming("m1", d) is False
    assert store.list_domains() == [d]
    assert store.journal_get("m1") is not None  # dstd removes it after answering
    assert any(e["event"] == "domain_persisted" and e["uuid"] == U1 for e in logs)
    store.journal_remove("m1")
    assert store.journal_get("m1") is None
    assert store.lookup("web") == d


def test_persist_incoming_replaces(store: HostStore) -> None:
    store.define(mkdef("web", U1, description="old"))
    assert store.reserve_incoming(incoming("m1", "web", U1)) is True
    assert store.persist_incoming("m1", mkdef("web", U1, description="new")) is True
    assert [d.description for d in store.list_domains()] == ["new"]


def test_persist_incoming_renamed(store: HostStore) -> None:
    d = mkdef("web", U1)
    store.reserve_incoming(incoming("m1", "web-b", U1))
    assert store.persist_incoming("m1", rename(d, "web-b")) is False
    assert [x.name for x in store.list_domains()] == ["web-b"]


def test_persist_incoming_rechecks_conflicts(store: HostStore) -> None:
    store.define(mkdef("other", U2))
    store.reserve_incoming(incoming("m1", "web", U1))
    with pytest.raises(DomainExists) as info:
        store.persist_incoming("m1", mkdef("other", U1))
    assert str(info.value) == f"domain 'other' already exists with uuid {U2}"
    store.reserve_incoming(incoming("m2", "db", U3))
    with pytest.raises(JobActive):
        store.persist_incoming("m1", mkdef("db", U1))
    assert [d.name for d in store.list_domains()] == ["other"]


def test_persist_without_reservation(store: HostStore) -> None:
    with pytest.raises(OperationInvalid) as info:
        store.persist_incoming("nope", mkdef("web", U1))
    assert str(info.value) == "no incoming migration with id 'nope'"
    store.journal_put(dataclasses.replace(incoming("src1", "web", U1), role="source"))
    with pytest.raises(OperationInvalid, match="no incoming migration with id 'src1'"):
        store.persist_incoming("src1", mkdef("web", U1))
    assert store.list_domains() == []


def test_release_incoming(store: HostStore) -> None:
    store.reserve_incoming(incoming("m1", "web", U1))
    store.release_incoming("m1")
    store.release_incoming("m1")  # absent: no error
    assert store.journal_list() == []
    store.define(mkdef("web", U1))
    store.journal_put(dataclasses.replace(incoming("s1", "db", U2), role="source"))
    store.release_incoming("s1")  # not a reservation: untouched
    assert store.journal_get("s1") is not None


# ---------------------------------------------------------------- journal


def test_journal_round_trip(store: HostStore) -> None:
    rec = JobRecord(
        migration_id="mig-2024.06_01:a",
        role="source",
        domain_name="web ü",
        domain_uuid=U1,
        phase="begin3",
        flags=0x41B,
        peer="[::1]:7302",
        xml=mkdef("web ü", U1).xml,
        dest_name="web-b",
        started_unix=1700000000.5,
    )
    store.journal_put(rec)
    got = store.journal_get(rec.migration_id)
    assert got is not None
    assert got.pid == os.getpid()
    assert got.updated_unix > 0
    assert dataclasses.replace(got, pid=0, updated_unix=0.0) == rec
    later = got.with_phase("perform3")
    assert later.phase == "perform3" and later.updated_unix >= got.updated_unix
    store.journal_put(later)
    assert store.journal_get(rec.migration_id) == dataclasses.replace(later, pid=os.getpid())
    store.journal_remove(rec.migration_id)
    store.journal_remove(rec.migration_id)
    assert store.journal_get(rec.migration_id) is None


def test_journal_list_by_role(store: HostStore) -> None:
    for i, role in enumerate(["source", "destination", "source"]):
        store.journal_put(
            dataclasses.replace(
                incoming(f"m{i}", f"vm{i}", str(uuidlib.uuid4())),
                role=role,
                started_unix=100.0 - i,
            )
        )
    assert [r.migration_id for r in store.journal_list()] == ["m2", "m1", "m0"]
    assert [r.migration_id for r in store.journal_list("source")] == ["m2", "m0"]
    assert [r.migration_id for r in store.journal_list("destination")] == ["m1"]


def test_journal_role_cannot_change(store: HostStore) -> None:
    store.journal_put(incoming("m1", "web", U1))
    with pytest.raises(OperationInvalid, match="already in use by a destination job"):
        store.journal_put(dataclasses.replace(incoming("m1", "web", U1), role="source"))
    with pytest.raises(InvalidArgument, match="invalid job role"):
        store.journal_put(dataclasses.replace(incoming("m2", "web", U1), role="sideways"))


def test_corrupt_journal_file_is_skipped(store: HostStore) -> None:
    store.journal_put(incoming("good", "web", U1))
    (store.state_dir / "jobs" / "bad.json").write_text("{not json")
    (store.state_dir / "jobs" / "wrong.json").write_text(json.dumps({"migration_id": "wrong"}))
    with capture_logs() as logs:
        assert [r.migration_id for r in store.journal_list()] == ["good"]
        assert store.journal_get("bad") is None
    assert {e["event"] for e in logs} == {"store_file_unreadable"}


@pytest.mark.parametrize("mid", ["a", "abc-1.2_3:4", "x" * 128, "0", "a.", "UPPER-lower"])
def test_valid_migration_ids(mid: str) -> None:
    validate_migration_id(mid)


@pytest.mark.parametrize(
    "mid", ["", ".hidden", "..", "a/b", "../x", "x" * 129, "ünï", "a b", "a\n", "a\x00"]
)
def test_invalid_migration_ids(store: HostStore, mid: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_migration_id(mid)
    assert str(info.value).startswith(f"invalid migration id {mid!r}: ")
    with pytest.raises(InvalidArgument):
        store.journal_get(mid)
    with pytest.raises(InvalidArgument):
        store.journal_put(incoming(mid, "web", U1))


# ---------------------------------------------------------------- concurrent writers

NAMES = ["vm0", "vm1", "vm2", "vm3"]
UUIDS = [
    "11111111-1111-4111-8111-111111111111",
    "22222222-2222-4222-8222-222222222222",
    "33333333-3333-4333-8333-333333333333",
    "44444444-4444-4444-8444-444444444444",
]


def run_ops(store: HostStore, tag: str, seed: int, count: int) -> list[dict[str, Any]]:
    """A random mix of store operations on a few overlapping names and UUIDs.

    Returns one entry per operation: what was asked, when (CLOCK_MONOTONIC, comparable
    across processes), and the outcome ("ok" / "replaced" or the error class).
    """
    rng = random.Random(seed)
    history: list[dict[str, Any]] = []
    job: tuple[JobLock, str, int] | None = None
    reservation: tuple[str, str, str, int] | None = None

    def record(op: str, fn: Any, args: tuple[Any, ...], **what: Any) -> Any:
        entry: dict[str, Any] = {"op": op, "tag": tag, **what}
        entry["t0"] = time.monotonic_ns()
        try:
            value = fn(*args)
            entry["result"] = "ok"
        except VmmigrateError as exc:
            value = None
            entry["result"] = type(exc).__name__
            entry["message"] = str(exc)
        entry["t1"] = time.monotonic_ns()
        history.append(entry)
        if op in ("define", "persist") and value is True:
            entry["result"] = "replaced"
        if op == "undefine" and value is not None:
            entry["removed"] = [value.name, value.uuid, value.description]
        return value

    for k in range(count):
        version = f"{tag}-{k}"
        if job is not None:
            lock, juuid, left = job
            job = (lock, juuid, left - 1) if left > 1 else None
            if job is None:
                record("release_job", lock.release, (), uuid=juuid)
        if reservation is not None:
            mid, rname, ruuid, left = reservation
            reservation = (mid, rname, ruuid, left - 1) if left > 1 else None
            if reservation is None:
                if rng.random() < 0.7:
                    d = mkdef(rname, ruuid, description=version)
                    record(
                        "persist",
                        store.persist_incoming,
                        (mid, d),
                        name=rname,
                        uuid=ruuid,
                        version=version,
                    )
                record("release_incoming", store.release_incoming, (mid,), mid=mid)
                continue
        name, uuid = rng.choice(NAMES), rng.choice(UUIDS)
        r = rng.random()
        if r < 0.5:
            d = mkdef(name, uuid, description=version)
            record("define", store.define, (d,), name=name, uuid=uuid, version=version)
        elif r < 0.8:
            key = name if rng.random() < 0.5 else uuid.upper()
            record("undefine", store.undefine, (key,), key=key)
        elif r < 0.9 and job is None:
            lock = record("acquire_job", store.acquire_job, (mkdef(name, uuid),), uuid=uuid)
            if lock is not None:
                job = (lock, uuid, rng.randint(1, 4))
        elif reservation is None:
            mid = f"{tag}-m{k}"
            ok = record(
                "reserve",
                store.reserve_incoming,
                (incoming(mid, name, uuid),),
                mid=mid,
                name=name,
                uuid=uuid,
            )
            if ok is not None:
                reservation = (mid, name, uuid, rng.randint(1, 4))
    if job is not None:
        record("release_job", job[0].release, (), uuid=job[1])
    if reservation is not None:
        mid = reservation[0]
        record("release_incoming", store.release_incoming, (mid,), mid=mid)
    return history


# run from the repository root, where this module is tests.unit.test_store
WORKER = """
import json, sys
import logging
import structlog
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)
from pathlib import Path
from vmmigrate.common.store import HostStore
from tests.unit.test_store import run_ops
store = HostStore(Path(sys.argv[1]))
print(json.dumps({"host_uuid": store.identity.host_uuid}), flush=True)
sys.stdin.readline()
history = run_ops(store, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
print(json.dumps(history), flush=True)
"""


def check_history(state_dir: Path, history: list[dict[str, Any]]) -> None:
    """The final state and every process's outcomes must tell one consistent story."""
    allowed = {"ok", "replaced", "DomainExists", "JobActive", "NoDomain"}
    assert {e["result"] for e in history} <= allowed, [
        e for e in history if e["result"] not in allowed
    ]

    # 1. Every file parses, is named by its UUID, nothing half-written, no duplicates.
    assert [p for p in all_files(state_dir) if p.name.startswith(".tmp-")] == []
    final: dict[str, DomainDef] = {}
    for path in (state_dir / "domains").iterdir():
        d = parse_domain(path.read_bytes(), generate_uuid=False)
        assert path.name == f"{d.uuid}.xml"
        final[d.uuid] = d
    names = [d.name for d in final.values()]
    assert len(names) == len(set(names))
    fresh = HostStore(state_dir)
    assert {d.uuid: d for d in fresh.list_domains()} == final
    assert fresh.journal_list() == []
    # no job is held; the lock files left are those of the domains still defined
    assert not any(fresh.job_held(u) for u in final)
    fresh.sweep_job_locks()
    assert {p.name for p in (state_dir / "locks").iterdir()} <= {"store.lock"} | {
        f"{u}.job" for u in final
    }

    # 2. Every surviving or removed version was written by an accepted define/persist.
    written = {
        e["version"]: e
        for e in history
        if e["op"] in ("define", "persist") and e["result"] in ("ok", "replaced")
    }
    for d in final.values():
        w = written[d.description]
        assert (w["name"], w["uuid"]) == (d.name, d.uuid)
    removed = [e for e in history if e["op"] == "undefine" and e["result"] == "ok"]
    seen_removed = set()
    for e in removed:
        name, uuid, version = e["removed"]
        w = written[version]
        assert (w["name"], w["uuid"]) == (name, uuid)
        assert w["t0"] < e["t1"]
        assert version not in seen_removed, "one version removed twice"
        seen_removed.add(version)
    assert not seen_removed & {d.description for d in final.values()}

    # 3. Conservation per UUID: created = removed + (still defined).
    for uuid in UUIDS:
        created = sum(1 for w in written.values() if w["uuid"] == uuid and w["result"] == "ok")
        gone = sum(1 for e in removed if e["removed"][1] == uuid)
        assert created == gone + (uuid in final), uuid

    # 4. While a job or a reservation is held, nobody else touches that domain.
    def touches(e: dict[str, Any], name: str | None, uuid: str) -> bool:
        if e["result"] not in ("ok", "replaced"):
            return False
        if e["op"] in ("define", "persist", "reserve"):
            return bool(e["uuid"] == uuid or e["name"] == name)
        if e["op"] == "undefine":
            return bool(e["removed"][1] == uuid or e["removed"][0] == name)
        if e["op"] == "acquire_job":
            return bool(e["uuid"] == uuid)
        return False

    holds: list[tuple[dict[str, Any], str | None, str, int, int]] = []
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for e in history:
        by_tag.setdefault(e["tag"], []).append(e)
    for entries in by_tag.values():
        for i, e in enumerate(entries):
            if e["result"] != "ok" or e["op"] not in ("acquire_job", "reserve"):
                continue
            end_op = "release_job" if e["op"] == "acquire_job" else "release_incoming"
            end = next(x for x in entries[i + 1 :] if x["op"] == end_op)
            holds.append((e, e.get("name"), e["uuid"], e["t1"], end["t0"]))
    for start, name, uuid, t_from, t_to in holds:
        for e in history:
            if e is start or not (t_from <= e["t0"] and e["t1"] <= t_to):
                continue
            if e["op"] == "persist" and start["op"] == "reserve" and e["tag"] == start["tag"]:
                continue  # the reservation's own Finish
            if start["op"] == "acquire_job" and e["op"] == "reserve":
                assert not (e["result"] == "ok" and e["uuid"] == uuid), (start, e)
                continue
            assert not touches(e, name if start["op"] == "reserve" else None, uuid), (start, e)


def test_two_processes_hammer_one_store(tmp_path: Path) -> None:
    state = tmp_path / "state"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(state), tag, str(seed), "200"],
            cwd=HERE.parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for tag, seed in (("p1", 1), ("p2", 2))
    ]
    try:
        identities = []
        for p in procs:
            assert p.stdout is not None
            identities.append(json.loads(p.stdout.readline())["host_uuid"])
        assert identities[0] == identities[1]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        history: list[dict[str, Any]] = []
        for p in procs:
            out, _ = p.communicate(timeout=240)
            assert p.returncode == 0
            history.extend(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    accepted = [e for e in history if e["result"] in ("ok", "replaced")]
    refused = [e for e in history if e["result"] not in ("ok", "replaced")]
    assert len(accepted) > 50 and len(refused) > 50  # the workload really did conflict
    assert {e["tag"] for e in refused} == {"p1", "p2"}
    check_history(state, history)


def test_threads_hammer_one_store(tmp_path: Path) -> None:
    shared = HostStore(tmp_path)
    second = HostStore(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(run_ops, shared if i % 2 else second, f"t{i}", 10 + i, 80) for i in range(4)
        ]
        history = [e for f in futures for e in f.result()]
    check_history(tmp_path, history)


def test_journal_record_bytes_are_those_of_the_dataclass() -> None:
    """The on-disk form of a journal record is the JSON of all its fields, sorted,
    whatever builds it; and it reads back as the same record."""
    from vmmigrate.common.journal import record_from_bytes, record_to_bytes

    rec = dataclasses.replace(
        incoming("m1", "web", U1), created_disks=("/a", "/b"), started_unix=1.5, pid=7
    )
    want = json.dumps(dataclasses.asdict(rec), sort_keys=True).encode()
    assert record_to_bytes(rec) == want
    assert record_from_bytes(want) == rec
