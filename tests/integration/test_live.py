"""Live migration with simvm: real srcd/dstd processes, real emulator processes, real memory.

The destination's memory must hash to what the source declared at switchover (simvm proves
it with x-simvm-checksum); after any failure the domain runs on exactly one host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers.hosts import Host, sample_domain_xml
from helpers.live import (
    alive,
    checksum,
    runs_on_exactly_one,
    set_dirty_rate,
    start_domain,
    state,
)
from helpers.qmp import qmp_for, runtime_record

LIVE = ("migrate", "--live", "--persistent")


def test_lifecycle_and_states(hosts: tuple[Host, Host], domname: str) -> None:
    a, _ = hosts
    u = start_domain(a, domname)
    assert state(a, domname) == "running"
    listed = a.migctl("list").stdout
    assert domname in listed and "running" in listed
    assert a.migctl("suspend", domname).stdout.strip() == f"Domain '{domname}' suspended"
    assert state(a, domname) == "paused"
    assert a.migctl("resume", domname).stdout.strip() == f"Domain '{domname}' resumed"
    r = a.migctl("start", domname, check=False)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: Failed to start domain '{domname}'",
        "error: Requested operation is not valid: domain is already running",
    ]
    info = a.migctl("dominfo", domname).stdout
    assert "State:          running" in info
    assert a.migctl("destroy", domname).stdout.strip() == f"Domain '{domname}' destroyed"
    assert state(a, domname) == "shut off"
    assert runtime_record(a.state_dir, u) is None


@pytest.mark.parametrize("mode", [["--p2p"], [], ["--p2p", "--tunnelled"]],
                         ids=["p2p", "managed", "tunnelled"])
def test_live_migration_moves_memory_intact(hosts: tuple[Host, Host], domname: str,
                                            mode: list[str]) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=64)
    set_dirty_rate(a, u, 2000)
    before = a.migctl("dumpxml", domname).stdout
    a.migctl(*LIVE, *mode, "--undefinesource", domname, b.dst)
    assert state(b, domname) == "running"
    assert state(a, domname) == "absent"  # undefined, and its emulator quit
    assert runtime_record(a.state_dir, u) is None
    sums = checksum(b, u)
    assert sums["source-sha256"] == sums["sha256"]
    assert b.migctl("dumpxml", domname, "--inactive").stdout.strip() == before.strip()
    assert a.journal() == [] and b.journal() == []
    # the completed job's statistics stay on the source... which no longer has the domain;
    # migrate back and look there
    b.migctl(*LIVE, "--p2p", domname, a.dst)
    assert state(a, domname) == "running" and state(b, domname) == "shut off"
    info = b.migctl("domjobinfo", domname, "--completed").stdout
    assert "Job type:         Completed" in info
    assert "Total downtime:" in info
    a.migctl("destroy", domname)


def test_live_suspend_and_dname_and_transient(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname)
    new = f"{domname}-b"
    # without --persistent the domain arrives transient; --suspend leaves it paused
    a.migctl("migrate", "--live", "--p2p", "--suspend", "--dname", new, domname, b.dst)
    assert state(b, new) == "paused"
    info = b.migctl("dominfo", new).stdout
    assert "Persistent:     no" in info and u in info
    assert state(a, domname) == "shut off"  # still defined on the source
    b.migctl("resume", new)
    assert state(b, new) == "running"
    b.migctl("destroy", new)
    assert state(b, new) == "absent"  # transient: gone once stopped


def test_offline_migration_of_running_domain_leaves_it_running(hosts: tuple[Host, Host],
                                                               domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname)
    a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", domname, b.dst)
    assert state(a, domname) == "running"  # libvirt's rule: a running source is not touched
    assert state(b, domname) == "shut off"
    assert runs_on_exactly_one(a, b, u) == "A"
    a.migctl("destroy", domname)


def test_live_migration_of_inactive_domain(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    r = a.migctl(*LIVE, "--p2p", domname, b.dst, check=False)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: Failed to migrate domain '{domname}'",
        "error: Requested operation is not valid: domain is not running",
    ]


def _slow_migration(a: Host, domname: str, extra: list[str], b: Host) -> subprocess.Popen[str]:
    """Start a live migration that takes a while (low bandwidth), in the background."""
    cmd = [sys.executable, "-m", "vmmigrate.migctl", "-c", a.src, *LIVE, "--p2p", *extra, domname, b.dst]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_job(a: Host, domname: str, timeout: float = 10) -> None:
    """Wait until the memory stream is flowing (not only the job taken in Begin)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = a.migctl("domjobinfo", domname).stdout
        if "Unbounded" in info and "Data processed:   0.000 MiB" not in info:
            return
        time.sleep(0.05)
    raise AssertionError("the migration job never showed up")


def test_domjobabort_from_another_client(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=64)
    before = checksum(a, u)["sha256"]
    proc = _slow_migration(a, domname, ["--bandwidth", "4"], b)
    _wait_job(a, domname)
    info = a.migctl("domjobinfo", domname).stdout
    assert "Operation:        Outgoing migration" in info
    a.migctl("domjobabort", domname)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.splitlines() == [
        f"error: Failed to migrate domain '{domname}'",
        "error: operation aborted: job 'migration out' canceled by client",
    ]
    assert state(a, domname) == "running" and state(b, domname) == "absent"
    assert runs_on_exactly_one(a, b, u) == "A"
    assert checksum(a, u)["sha256"] == before  # no dirtying: memory exactly as it was
    assert a.journal() == [] and b.journal() == []
    r = a.migctl("domjobabort", domname, check=False)
    assert r.stderr.strip() == "error: Requested operation is not valid: no job is active on the domain"
    a.migctl("destroy", domname)


def test_ctrl_c_aborts_cleanly(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=64)
    proc = _slow_migration(a, domname, ["--bandwidth", "4", "--verbose"], b)
    _wait_job(a, domname)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "canceled by client" in err
    assert "Migration: [" in out
    assert state(a, domname) == "running" and runs_on_exactly_one(a, b, u) == "A"
    a.migctl("destroy", domname)


def test_destination_emulator_dies_mid_transfer(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=64)
    before = checksum(a, u)["sha256"]
    proc = _slow_migration(a, domname, ["--bandwidth", "4"], b)
    _wait_job(a, domname)
    rec = runtime_record(b.state_dir, u)
    assert rec is not None
    os.kill(rec["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert err.splitlines()[0] == f"error: Failed to migrate domain '{domname}'", err
    assert err.splitlines()[1].startswith("error: operation failed: job 'migration out' failed"), err
    assert state(a, domname) == "running"
    assert runs_on_exactly_one(a, b, u) == "A"
    assert checksum(a, u)["sha256"] == before
    assert b.journal() == [] and state(b, domname) == "absent"
    a.migctl("destroy", domname)


def test_timeout_without_suspend_aborts(hosts: tuple[Host, Host], domname: str) -> None:
    """An RPC caller may ask for an abort at the timeout (timeout_suspend unset); migctl,
    like virsh, always suspends (test_timeout_alone_suspends)."""
    import grpc
    from vmmigrate.common.flags import MigrateFlag

    from vmmigrate.v1 import vmmigrate_pb2 as pb
    from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

    a, b = hosts
    u = start_domain(a, domname, memory_mib=16)
    set_dirty_rate(a, u, 20000)  # ~80 MiB/s of dirtying against a 2 MiB/s cap
    request = pb.MigrateRequest(
        domain=domname, dest_uri=b.dst,
        flags=int(MigrateFlag.LIVE | MigrateFlag.PEER2PEER | MigrateFlag.PERSIST_DEST),
        params=pb.MigrationParams(bandwidth_mib=2, timeout_s=1),
    )
    with (
        grpc.insecure_channel(a.src, options=[("grpc.enable_http_proxy", 0)]) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.DomainServiceStub(ch).Migrate(request, timeout=60)
    assert err.value.details() == "operation aborted: migration did not complete within 1 s"
    assert state(a, domname) == "running" and runs_on_exactly_one(a, b, u) == "A"
    a.migctl("destroy", domname)


def test_timeout_alone_suspends(hosts: tuple[Host, Host], domname: str) -> None:
    """virsh's rule: --timeout without --timeout-suspend suspends the guest all the same."""
    a, b = hosts
    u = start_domain(a, domname, memory_mib=16)
    set_dirty_rate(a, u, 20000)
    a.migctl(*LIVE, "--p2p", "--bandwidth", "64", "--timeout", "1", domname, b.dst)
    assert state(b, domname) == "running" and runs_on_exactly_one(a, b, u) == "B"
    b.migctl("destroy", domname)


def test_timeout_suspend_completes(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=16)
    set_dirty_rate(a, u, 20000)
    a.migctl(*LIVE, "--p2p", "--bandwidth", "64", "--timeout", "1", "--timeout-suspend",
             domname, b.dst)
    assert state(b, domname) == "running" and runs_on_exactly_one(a, b, u) == "B"
    sums = checksum(b, u)
    assert sums["source-sha256"] == sums["sha256"]
    b.migctl("destroy", domname)


@pytest.mark.slow
def test_auto_converge(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=16)
    set_dirty_rate(a, u, 20000)
    a.migctl(*LIVE, "--p2p", "--bandwidth", "16", "--auto-converge", domname, b.dst,
             timeout=120)
    assert state(b, domname) == "running" and runs_on_exactly_one(a, b, u) == "B"
    b.migctl("destroy", domname)


def test_setspeed_getspeed_and_verbose(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=32)
    assert a.migctl("migrate-getspeed", domname).stdout.strip() == "8796093022207"
    a.migctl("migrate-setspeed", domname, "16")
    assert a.migctl("migrate-getspeed", domname).stdout.strip() == "16"
    a.migctl("migrate-setmaxdowntime", domname, "50")
    r = a.migctl(*LIVE, "--p2p", "--verbose", domname, b.dst)
    percents = [int(p) for p in __import__("re").findall(r"\[\s*(\d+) %\]", r.stdout)]
    assert percents and percents[-1] == 100
    assert percents == sorted(percents)  # never backwards
    assert runs_on_exactly_one(a, b, u) == "B"
    b.migctl("destroy", domname)


def test_two_live_migrations_of_one_domain(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    u = start_domain(a, domname, memory_mib=64)
    proc = _slow_migration(a, domname, ["--bandwidth", "16"], b)
    _wait_job(a, domname)
    results: list[str] = []
    t = threading.Thread(target=lambda: results.append(
        a.migctl(*LIVE, "--p2p", domname, b.dst, check=False).stderr))
    t.start()
    t.join()
    assert len(results) == 1 and results[0].endswith(
        f"another migration job is already running for domain '{domname}'\n")
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert runs_on_exactly_one(a, b, u) == "B"
    b.migctl("destroy", domname)


def test_restarted_daemons_reattach_to_running_domains(fresh_hosts: tuple[Host, Host]) -> None:
    """Emulators outlive their daemons: a restarted srcd sees the domain running and can
    still control and migrate it."""
    a, b = fresh_hosts
    a.start()
    b.start()
    u = start_domain(a, "survivor")
    rec = runtime_record(a.state_dir, u)
    assert rec is not None
    assert a.srcd is not None and a.dstd is not None
    a.srcd.kill()
    a.dstd.kill()
    assert alive(rec["pid"])
    a.start()
    assert state(a, "survivor") == "running"
    a.migctl("suspend", "survivor")
    assert state(a, "survivor") == "paused"
    a.migctl("resume", "survivor")
    a.migctl(*LIVE, "--p2p", "--undefinesource", "survivor", b.dst)
    assert state(b, "survivor") == "running" and not alive(rec["pid"])
    b.migctl("destroy", "survivor")


def test_destination_resumes_before_it_persists(fresh_hosts: tuple[Host, Host],
                                                domname: str) -> None:
    """Live Finish resumes the guest before it writes the definition (the flush is not
    part of the pause): with the persist held back (a failpoint's delay), the destination's
    emulator already runs while no definition is on its disk yet; the migration then ends
    as always, the definition persisted and the events in libvirt's order."""
    a, b = fresh_hosts
    a.start()
    b.start(env={"VMMIGRATE_FAILPOINTS": "dstd.finish.before_persist=delay(3000)"})
    u = start_domain(a, domname)
    results: list[int] = []
    mig = threading.Thread(target=lambda: results.append(a.migctl(
        *LIVE, "--p2p", "--undefinesource", domname, b.dst, check=False).returncode))
    mig.start()
    try:
        seen = ""
        until = time.monotonic() + 60
        while time.monotonic() < until and seen != "running":
            time.sleep(0.05)
            if runtime_record(b.state_dir, u) is None:
                continue
            try:
                with qmp_for(b.state_dir, u) as q:
                    seen = str(q.cmd("query-status").get("status", ""))
            except OSError:
                continue
        assert seen == "running"
        assert b.domain_files() == []  # the persist waits in its failpoint
    finally:
        mig.join(timeout=60)
    assert results == [0]
    assert b.names() == [domname] and a.names() == []
    assert len(b.domain_files()) == 1
    assert state(b, domname) == "running"
    assert runs_on_exactly_one(a, b, u) == "B"
