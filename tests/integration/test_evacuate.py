"""migctl evacuate end to end: real srcd and dstd processes for two hosts, simvm guests, each
domain moved by one p2p Migrate. Each test has hosts of its own: an evacuation takes every
domain of its host."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
import uuid as uuidlib

import grpc
from helpers.hosts import Host, sample_domain_xml, wait_until
from helpers.live import runs_on_exactly_one, start_domain, state

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc


def _define(h: Host, name: str, u: str | None = None) -> str:
    u = u or str(uuidlib.uuid4())
    h.define(sample_domain_xml(name, u), f"{name}.xml")
    return u


def _summary(out: str) -> list[str]:
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("Evacuation to "))
    return lines[first:]


def _persistent(h: Host, name: str) -> bool:
    info = h.migctl("dominfo", name).stdout
    assert "Persistent:" in info
    return "Persistent:     yes" in info


def test_evacuate_everything(fresh_hosts: tuple[Host, Host]) -> None:
    """20 inactive, 2 running persistent and 1 running transient domain, 4 at a time."""
    a, b = fresh_hosts
    a.start()
    b.start()
    inactive = [f"evac-off-{i:02d}" for i in range(20)]
    for name in inactive:
        _define(a, name)
    running = {name: start_domain(a, name, memory_mib=16) for name in ("evac-run-0", "evac-run-1")}
    # a transient one: started on B, moved to A live without --persistent
    transient_uuid = start_domain(b, "evac-transient", memory_mib=16)
    b.migctl("migrate", "--live", "--p2p", "--undefinesource", "evac-transient", a.dst)
    assert not _persistent(a, "evac-transient") and "evac-transient" not in b.names()

    r = a.migctl("evacuate", "--parallel", "4", b.dst, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    # not a terminal: one line per domain as it ends, then the summary
    ends = [line for line in r.stdout.splitlines() if ": moved (" in line and line[0] != " "]
    assert len(ends) == 23
    summary = _summary(r.stdout)
    assert summary[0] == f"Evacuation to {b.dst}: 23 moved, 0 not moved"
    assert summary[1] == "Moved (23):"
    assert "  evac-run-0 (live)" in summary and "  evac-off-07 (offline)" in summary
    assert "  evac-transient (live)" in summary

    assert a.names() == []
    assert sorted(b.names()) == sorted([*inactive, *running, "evac-transient"])
    for name, u in running.items():
        assert state(b, name) == "running" and _persistent(b, name)
        assert runs_on_exactly_one(a, b, u) == "B"
    assert state(b, "evac-transient") == "running" and not _persistent(b, "evac-transient")
    assert runs_on_exactly_one(a, b, transient_uuid) == "B"
    for name in inactive[::7]:
        assert state(b, name) == "shut off" and _persistent(b, name)
    assert a.journal() == [] and b.journal() == []
    assert a.domain_files() == []
    # the source's history: one ordinary p2p migration per domain
    jobs = [j for j in json.loads(a.migctl("jobs", "--json").stdout) if j["role"] == "source"]
    assert sorted((j["kind"], j["mode"], j["result"]) for j in jobs) == (
        [("live", "p2p", "completed")] * 3 + [("offline", "p2p", "completed")] * 20)
    for name in (*running, "evac-transient"):
        b.migctl("destroy", name)


def test_a_refused_domain_is_reported_and_the_others_move(fresh_hosts: tuple[Host, Host]) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    names = [f"evac-c-{i}" for i in range(5)]
    uuids = {name: _define(a, name) for name in names}
    other = _define(b, "evac-c-2")  # same name, another domain, on the destination
    r = a.migctl("evacuate", "--parallel", "2", b.dst, check=False)
    assert r.returncode == 1
    refusal = f"operation failed: domain 'evac-c-2' already exists with uuid {other}"
    assert f"evac-c-2: not moved: {refusal}" in r.stdout.splitlines()
    summary = _summary(r.stdout)
    assert summary[0] == f"Evacuation to {b.dst}: 4 moved, 1 not moved"
    assert summary[-2:] == ["Not moved (1):", f"  evac-c-2: {refusal}"]
    assert r.stderr.splitlines() == ["error: Failed to evacuate 1 of 5 domain(s)"]
    assert a.names() == ["evac-c-2"]
    assert a.migctl("domuuid", "evac-c-2").stdout.strip() == uuids["evac-c-2"]
    assert sorted(b.names()) == names
    assert b.migctl("domuuid", "evac-c-2").stdout.strip() == other  # untouched
    assert a.journal() == [] and b.journal() == []


def test_domain_selects_and_live_offline_choose(fresh_hosts: tuple[Host, Host]) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    for name in ("evac-s-off-0", "evac-s-off-1", "evac-s-off-2"):
        _define(a, name)
    u = start_domain(a, "evac-s-run", memory_mib=16)

    # --live: the running one moves, a named inactive one is reported with migrate's text
    r = a.migctl("evacuate", "--live", "--domain", "evac-s-run", "--domain", "evac-s-off-0",
                 "--domain", "evac-s-none", b.dst, check=False)
    assert r.returncode == 1
    assert _summary(r.stdout) == [
        f"Evacuation to {b.dst}: 1 moved, 2 not moved",
        "Moved (1):",
        "  evac-s-run (live)",
        "Not moved (2):",
        "  evac-s-none: Domain not found: no domain with matching name 'evac-s-none'",
        "  evac-s-off-0: Requested operation is not valid: domain is not running",
    ]
    assert runs_on_exactly_one(a, b, u) == "B" and "evac-s-run" not in a.names()
    assert sorted(a.names()) == ["evac-s-off-0", "evac-s-off-1", "evac-s-off-2"]

    # --offline, named by name and by UUID (the same domain once), on a terminal: the
    # progress line is rewritten in place
    start_domain(a, "evac-s-run2", memory_mib=16)
    u1 = a.migctl("domuuid", "evac-s-off-1").stdout.strip()
    code, out = _on_a_terminal(a, "evacuate", "--offline", "--domain", "evac-s-off-1",
                               "--domain", u1, "--domain", "evac-s-off-2", b.dst)
    assert code == 0, out
    assert "\revacuate: 0/2 moved, 0 not moved, 1 running" in out
    assert "\revacuate: 2/2 moved, 0 not moved, 0 running" in out
    assert "evac-s-off-1: moved" not in out  # no per-domain lines on a terminal
    assert f"Evacuation to {b.dst}: 2 moved, 0 not moved" in out
    assert sorted(a.names()) == ["evac-s-off-0", "evac-s-run2"]

    # --offline without --domain: the running one stays, with the reason
    r = a.migctl("evacuate", "--offline", b.dst, check=False)
    assert r.returncode == 1
    assert _summary(r.stdout)[-2:] == [
        "Not moved (1):",
        "  evac-s-run2: Requested operation is not valid: domain is running: evacuate "
        "--offline moves inactive domains",
    ]
    assert a.names() == ["evac-s-run2"] and state(a, "evac-s-run2") == "running"
    assert a.journal() == [] and b.journal() == []
    a.migctl("destroy", "evac-s-run2")
    b.migctl("destroy", "evac-s-run")


def _on_a_terminal(h: Host, *args: str) -> tuple[int, str]:
    """migctl with its stdout on a pseudo-terminal: (exit status, what it wrote there)."""
    main, side = pty.openpty()
    cmd = [sys.executable, "-m", "vmmigrate.migctl", "-c", h.src, *args]
    proc = subprocess.Popen(cmd, stdout=side, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.close(side)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    return proc.wait(timeout=120), b"".join(chunks).decode().replace("\r\n", "\n")


def _background_evacuation(a: Host, b: Host, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "vmmigrate.migctl", "-c", a.src, "evacuate", "--parallel", "1",
           *extra, b.dst]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def _stream_flowing(a: Host, name: str) -> bool:
    info = a.migctl("domjobinfo", name).stdout
    return "Unbounded" in info and "Data processed:   0.000 MiB" not in info


def test_ctrl_c_lets_the_running_migration_finish(fresh_hosts: tuple[Host, Host]) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    u = start_domain(a, "evac-i-run", memory_mib=16)
    for name in ("evac-i-off-0", "evac-i-off-1"):
        _define(a, name)
    proc = _background_evacuation(a, b, "--bandwidth", "8")  # 16 MiB: about 2 s
    wait_until(lambda: _stream_flowing(a, "evac-i-run"), 30, "the live migration's stream")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "migctl: interrupted: no new migration starts; waiting for the 1 running" in err
    assert err.splitlines()[-1] == "error: Failed to evacuate 2 of 3 domain(s)"
    assert _summary(out) == [
        f"Evacuation to {b.dst}: 1 moved, 2 not moved",
        "Moved (1):",
        "  evac-i-run (live)",
        "Not moved (2):",
        "  evac-i-off-0: operation aborted: evacuation interrupted before this domain's turn",
        "  evac-i-off-1: operation aborted: evacuation interrupted before this domain's turn",
    ]
    assert runs_on_exactly_one(a, b, u) == "B"
    assert sorted(a.names()) == ["evac-i-off-0", "evac-i-off-1"]
    assert a.journal() == [] and b.journal() == []
    b.migctl("destroy", "evac-i-run")


def test_second_ctrl_c_aborts_the_running_migration(fresh_hosts: tuple[Host, Host]) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    u = start_domain(a, "evac-j-run", memory_mib=64)
    _define(a, "evac-j-off")
    proc = _background_evacuation(a, b, "--bandwidth", "2")  # 64 MiB: about 30 s
    wait_until(lambda: _stream_flowing(a, "evac-j-run"), 30, "the live migration's stream")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two presses, not one: the second comes after the first was handled
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "migctl: aborting 1 live migration(s)" in err
    assert _summary(out) == [
        f"Evacuation to {b.dst}: 0 moved, 2 not moved",
        "Not moved (2):",
        "  evac-j-off: operation aborted: evacuation interrupted before this domain's turn",
        "  evac-j-run: operation aborted: job 'migration out' canceled by client",
    ]
    assert state(a, "evac-j-run") == "running" and runs_on_exactly_one(a, b, u) == "A"
    assert sorted(a.names()) == ["evac-j-off", "evac-j-run"] and b.names() == []
    assert a.journal() == [] and b.journal() == []
    a.migctl("destroy", "evac-j-run")


def test_many_inactive_domains_move_in_one_stream_and_batches(
    fresh_hosts: tuple[Host, Host],
) -> None:
    """migctl evacuate sends one MigrateMany: srcd runs the 120 offline migrations itself,
    many in flight at once (with --parallel 2), so their Prepares and Finishes reach dstd
    in PrepareBatch/FinishBatch calls; every domain ends on exactly one host, each an
    ordinary p2p migration in the source's history."""
    a, b = fresh_hosts
    a.start()
    b.start()
    names = [f"evac-m-{i:03d}" for i in range(120)]
    for name in names:
        _define(a, name)
    r = a.migctl("evacuate", "--parallel", "2", b.dst, check=False)
    assert r.returncode == 0, r.stderr
    assert _summary(r.stdout)[0] == f"Evacuation to {b.dst}: 120 moved, 0 not moved"
    assert a.names() == [] and sorted(b.names()) == names
    assert a.journal() == [] and b.journal() == [] and a.domain_files() == []
    assert a.srcd is not None and b.dstd is not None
    srcd_log = [json.loads(line) for line in a.srcd.output().splitlines() if line.startswith("{")]
    started = [e for e in srcd_log if e.get("event") == "evacuation_started"]
    assert len(started) == 1 and started[0]["domains"] == 120 and started[0]["parallel"] == 2
    assert not any(e.get("rpc") == "Migrate" for e in srcd_log)  # no per-domain RPC
    dstd_log = [json.loads(line) for line in b.dstd.output().splitlines() if line.startswith("{")]
    # most Finishes came in batches, their definitions written in groups (one line each)
    groups = [e for e in dstd_log if e.get("event") == "domains_persisted"]
    assert sum(e["count"] for e in groups) >= 60
    assert all(e.get("batch") for e in groups)
    jobs = [j for j in json.loads(a.migctl("jobs", "--json").stdout) if j["role"] == "source"]
    assert sorted({(j["kind"], j["mode"], j["result"]) for j in jobs}) == [
        ("offline", "p2p", "completed")]
    assert len(jobs) == 120


def test_migrate_many_refuses_a_bad_request_before_anything_moves(
    fresh_hosts: tuple[Host, Host],
) -> None:
    """A MigrateMany whose first message is not a start, or whose start is bad, ends with
    INVALID_ARGUMENT and moves nothing."""
    a, b = fresh_hosts
    a.start()
    b.start()
    _define(a, "evac-bad-0")
    bad = [
        pb.MigrateManyRequest(stop=True),
        pb.MigrateManyRequest(start=pb.MigrateManyStart(dest_uri=b.dst, parallel=0)),
        pb.MigrateManyRequest(start=pb.MigrateManyStart(parallel=1)),
        pb.MigrateManyRequest(start=pb.MigrateManyStart(dest_uri=b.dst, parallel=1,
                                                        flags=1)),  # LIVE: srcd's choice
    ]
    with grpc.insecure_channel(a.src) as ch:
        stub = pb_grpc.DomainServiceStub(ch)
        for msg in bad:
            try:
                list(stub.MigrateMany(iter([msg]), timeout=10))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            else:
                raise AssertionError(f"accepted: {msg}")
    assert a.names() == ["evac-bad-0"] and b.names() == []
