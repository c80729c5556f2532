"""Daemons killed mid-migration and restarted: a domain is never lost, never half-defined."""

from __future__ import annotations

import threading
import uuid as uuidlib

import grpc
import pytest
from helpers.hosts import Host, sample_domain_xml, settled
from vmmigrate.common.flags import MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

OFFLINE = int(MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST)
OPTS = [("grpc.enable_http_proxy", 0)]


def test_destination_killed_between_prepare_and_finish(fresh_hosts: tuple[Host, Host]) -> None:
    """Client-driven, phase by phase: Begin, Prepare, then dstd dies; Finish fails, Confirm
    cancels; after dstd restarts nothing is defined there and the source is untouched."""
    a, b = fresh_hosts
    a.start()
    b.start()
    u = str(uuidlib.uuid4())
    a.define(sample_domain_xml("victim", u), "victim.xml")
    before = a.migctl("dumpxml", "victim").stdout
    mid = "crash-between-prepare-and-finish"
    flags = OFFLINE | int(MigrateFlag.UNDEFINE_SOURCE | MigrateFlag.CHANGE_PROTECTION)
    with grpc.insecure_channel(a.src, options=OPTS) as sch, \
            grpc.insecure_channel(b.dst, options=OPTS) as dch:
        src = pb_grpc.MigrationSourceServiceStub(sch)
        dst = pb_grpc.MigrationDestinationServiceStub(dch)
        begun = src.Begin(pb.BeginRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=flags), domain="victim"), timeout=10)
        dst.Prepare(pb.PrepareRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE, cookie=begun.cookie),
            domain_xml=begun.domain_xml), timeout=10)
        assert len(b.journal()) == 1  # the reservation, never a definition
        assert b.domain_files() == []
        assert b.dstd is not None
        b.dstd.kill()
        with pytest.raises(grpc.RpcError) as err:
            dst.Finish(pb.FinishRequest(header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE),
                                        dest_name="victim"), timeout=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        src.Confirm(pb.ConfirmRequest(header=pb.PhaseHeader(migration_id=mid, flags=flags),
                                      domain="victim", cancelled=True), timeout=10)
    b.start_dstd()
    assert b.journal() == [] and b.domain_files() == []
    assert b.names() == []
    assert a.migctl("dumpxml", "victim").stdout == before and a.journal() == []
    # the same migration now runs to its end
    a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", "victim", b.dst)
    assert b.names() == ["victim"] and a.names() == []


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", ["dstd.finish.before_persist", "dstd.prepare.after_reserve",
                                       "dstd.finish.after_persist", "dstd.finish.after_outcome"])
def test_destination_crashes_during_p2p(fresh_hosts: tuple[Host, Host], failpoint: str) -> None:
    """p2p with the destination crashing inside Prepare or Finish (a failpoint): the source
    keeps the domain while the outcome is unknown; once the destination is back, both hosts
    settle on one outcome, and the domain is defined on exactly one host (--undefinesource)."""
    a, b = fresh_hosts
    a.start(srcd_args=["--rpc-timeout", "2"])  # how long a lost Finish answer is asked for
    b.start(env={"VMMIGRATE_FAILPOINTS": f"{failpoint}=crash"})
    u = str(uuidlib.uuid4())
    a.define(sample_domain_xml("victim", u), "victim.xml")
    before = a.migctl("dumpxml", "victim").stdout
    r = a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", "victim",
                 b.dst, check=False)
    assert r.returncode == 1
    if failpoint.startswith("dstd.prepare"):
        assert "\nerror: unable to connect to destination host" in r.stderr, r.stderr
    else:
        assert "Lost connection to destination host during Finish" in r.stderr, r.stderr
    assert b.dstd is not None
    assert b.dstd.proc.wait(timeout=10) == 137
    assert a.migctl("dumpxml", "victim").stdout == before
    b.start_dstd()
    settled(a, b)
    persisted = failpoint in ("dstd.finish.after_persist", "dstd.finish.after_outcome")
    owner, other = (b, a) if persisted else (a, b)
    assert owner.names() == ["victim"] and other.names() == [] and other.domain_files() == []
    assert owner.migctl("dumpxml", "victim").stdout == before
    owner.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", "victim",
                 other.dst)
    assert other.names() == ["victim"] and owner.names() == []


@pytest.mark.slow
def test_definitions_survive_daemon_restarts(fresh_hosts: tuple[Host, Host]) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    for i in range(3):
        a.define(sample_domain_xml(f"keep{i}"), f"keep{i}.xml")
    a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", "keep0", b.dst)
    a.migctl("migrate", "--offline", "--persistent", "keep1", b.dst)
    xml0 = b.migctl("dumpxml", "keep0").stdout
    uuid_a = a.migctl("domuuid", "keep2").stdout
    a.stop()
    b.stop()
    a.start()
    b.start()
    assert a.names() == ["keep1", "keep2"]
    assert b.names() == ["keep0", "keep1"]
    assert b.migctl("dumpxml", "keep0").stdout == xml0
    assert a.migctl("domuuid", "keep2").stdout == uuid_a


def test_second_migration_of_same_domain_is_refused(hosts: tuple[Host, Host], domname: str) -> None:
    """A domain held by a client-driven migration (Begin done) refuses a second one."""
    a, b = hosts
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    flags = OFFLINE | int(MigrateFlag.CHANGE_PROTECTION)
    with grpc.insecure_channel(a.src, options=OPTS) as sch:
        src = pb_grpc.MigrationSourceServiceStub(sch)
        src.Begin(pb.BeginRequest(header=pb.PhaseHeader(migration_id=f"hold-{domname}",
                                                        flags=flags), domain=domname), timeout=10)
        for mode in (["--p2p"], []):
            r = a.migctl("migrate", "--offline", "--persistent", *mode, domname, b.dst,
                         check=False)
            assert r.returncode == 1
            assert r.stderr.splitlines() == [
                f"error: Failed to migrate domain '{domname}'",
                "error: Requested operation is not valid: "
                f"another migration job is already running for domain '{domname}'",
            ]
        r = a.migctl("undefine", domname, check=False)
        assert r.returncode == 1 and "a migration job is running" in r.stderr
        src.Confirm(pb.ConfirmRequest(header=pb.PhaseHeader(migration_id=f"hold-{domname}",
                                                            flags=flags),
                                      domain=domname, cancelled=True), timeout=10)
    a.migctl("migrate", "--offline", "--persistent", "--p2p", domname, b.dst)
    assert domname in b.names()


def test_concurrent_p2p_migrations_of_one_domain(hosts: tuple[Host, Host], domname: str) -> None:
    """Two clients migrate the same domain at the same moment: exactly one refusal or both
    succeed one after the other; never two jobs at once, and the end state is consistent."""
    a, b = hosts
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    results: list[int] = []

    def run() -> None:
        r = a.migctl("migrate", "--offline", "--persistent", "--p2p", domname, b.dst, check=False)
        results.append(r.returncode)
        if r.returncode:
            assert "another migration job is already running" in r.stderr or \
                "is being migrated to this host" in r.stderr or \
                "another migration job is already running" in r.stderr, r.stderr

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 in results
    assert domname in a.names() and domname in b.names()
    assert a.journal() == [] and b.journal() == []


@pytest.mark.parametrize("kind", ["--offline", "--live"])
def test_finish_failing_after_persist_takes_the_definition_back(
        fresh_hosts: tuple[Host, Host], kind: str) -> None:
    """Finish persists, then fails (an injected error): the source keeps the domain, so the
    destination takes its new definition back; the domain is defined on one host only."""
    a, b = fresh_hosts
    a.start()
    b.start(env={"VMMIGRATE_FAILPOINTS": "dstd.finish.after_persist=error"})
    a.define(sample_domain_xml("undo", str(uuidlib.uuid4())), "undo.xml")
    if kind == "--live":
        a.migctl("start", "undo")
    r = a.migctl("migrate", kind, "--persistent", "--p2p", "--undefinesource", "undo", b.dst,
                 check=False)
    assert r.returncode == 1
    assert "failpoint dstd.finish.after_persist injected an error" in r.stderr
    settled(a, b)
    assert a.names() == ["undo"] and b.names() == [] and b.domain_files() == []
    if kind == "--live":
        assert a.migctl("domstate", "undo").stdout.strip() == "running"
