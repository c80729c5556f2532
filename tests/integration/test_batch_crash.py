"""The fault matrix for batched migrations (docs/ARCHITECTURE.md, "Batched phase calls"):
many offline migrations from one host to another share FinishBatch calls and group commits,
and a daemon killed in the middle of one leaves every domain of the batch defined on exactly
one host once the daemons are back and recovery has run."""

from __future__ import annotations

import uuid as uuidlib

import pytest
from helpers.hosts import Host, sample_domain_xml, settled, wait_until

N = 8


def _define_many(a: Host) -> list[str]:
    names = [f"batch-{i}" for i in range(N)]
    for nm in names:
        a.define(sample_domain_xml(nm, str(uuidlib.uuid4())), f"{nm}.xml")
    return names


def _evacuate(a: Host, b: Host) -> int:
    r = a.migctl("evacuate", "--offline", "--parallel", str(N), b.dst, check=False, timeout=180)
    return r.returncode


def _one_owner_each(a: Host, b: Host, names: list[str]) -> tuple[set[str], set[str]]:
    """Every domain defined on exactly one host (listed, and its file); returns (on A, on B)."""
    on_a, on_b = set(a.names()), set(b.names())
    for nm in names:
        assert (nm in on_a) != (nm in on_b), f"{nm}: on A {nm in on_a}, on B {nm in on_b}"
    assert len(a.domain_files()) == len(on_a & set(names))
    assert len(b.domain_files()) == len(on_b & set(names))
    return on_a, on_b


@pytest.mark.slow
def test_destination_killed_midway_through_a_group_commit(fresh_hosts: tuple[Host, Host]) -> None:
    """dstd dies in the middle of writing a FinishBatch's definitions (half renamed into
    place, half not). The definitions written before the crash are settled as finished, the
    others as cancelled (the sources keep theirs): after recovery each domain is on exactly
    one host, some moved and some not."""
    a, b = fresh_hosts
    a.start(srcd_args=["--rpc-timeout", "2"])  # how long a lost Finish answer is asked for
    # the first Finish (sent alone) is slow: the other seven queue into one FinishBatch,
    # whose items reach the group commit together
    b.start(env={"VMMIGRATE_FAILPOINTS":
                 "dstd.finish.before=delay(300);dstd.finish.persist_group_midway=crash"})
    names = _define_many(a)
    assert _evacuate(a, b) == 1
    assert b.dstd is not None
    assert b.dstd.proc.wait(timeout=30) == 137
    assert "persist_group_midway" in b.dstd.output()
    b.start_dstd()
    settled(a, b, timeout=60)
    on_a, on_b = _one_owner_each(a, b, names)
    assert on_a and on_b, (on_a, on_b)  # the batch was cut in the middle
    # and the rest moves on a second run
    assert _evacuate(a, b) == 0
    assert a.names() == [] and sorted(b.names()) == sorted(names)


@pytest.mark.slow
def test_source_killed_with_a_finish_batch_answered(fresh_hosts: tuple[Host, Host]) -> None:
    """srcd dies after a FinishBatch's answers arrived (the destination defined those
    domains) and before any of their Confirms: the restarted srcd asks the destination how
    each ended and removes its own definition of each one that finished there."""
    a, b = fresh_hosts
    a.start(env={"VMMIGRATE_FAILPOINTS": "srcd.finish.batch_answered=crash"})
    b.start(env={"VMMIGRATE_FAILPOINTS": "dstd.finish.before=delay(300)"})
    names = _define_many(a)
    assert _evacuate(a, b) == 1
    assert a.srcd is not None
    assert a.srcd.proc.wait(timeout=30) == 137
    assert "batch_answered" in a.srcd.output()
    a.start_srcd()
    settled(a, b, timeout=60)
    wait_until(lambda: len(a.names()) + len(b.names()) == N, 30, "every domain settled")
    on_a, on_b = _one_owner_each(a, b, names)
    assert len(on_b) >= 2  # at least the batch's domains finished there
    if on_a:  # those whose Finish had not been sent: the next run moves them
        assert _evacuate(a, b) == 0
    assert a.names() == [] and sorted(b.names()) == sorted(names)


MANY = 40


@pytest.mark.slow
@pytest.mark.parametrize(
    ("daemon", "failpoint"),
    [
        ("srcd", "srcd.begin.after_journal"),
        ("srcd", "srcd.confirm.after_undefine"),
        ("dstd", "dstd.prepare.after_reserve"),
        ("dstd", "dstd.finish.after_outcome"),
    ],
)
def test_daemon_killed_midway_through_a_migrate_many(
    fresh_hosts: tuple[Host, Host], daemon: str, failpoint: str
) -> None:
    """One MigrateMany (migctl evacuate) of 40 inactive domains, up to 40 in flight and
    batched; the source's srcd or the destination's dstd is killed at a failpoint hit on
    about one migration in ten, so some domains have moved, some are in flight (journalled
    at Begin, reserved, defined, undefined) and some not started. migctl reports every
    domain (those it had no answer for with the broken stream's error) and exits 1; once
    the daemon is back and recovery has run, each domain is defined on exactly one host,
    and a second evacuation moves the rest."""
    a, b = fresh_hosts
    env = {"VMMIGRATE_FAILPOINTS": f"{failpoint}=crash@10", "VMMIGRATE_FAILPOINT_SEED": "12"}
    a.start(env=env if daemon == "srcd" else None)
    b.start(env=env if daemon == "dstd" else None)
    names = [f"many-{i:02d}" for i in range(MANY)]
    for nm in names:
        a.define(sample_domain_xml(nm, str(uuidlib.uuid4())), f"{nm}.xml")
    r = a.migctl("evacuate", "--offline", "--parallel", str(MANY), b.dst, check=False,
                 timeout=180)
    assert r.returncode == 1, r.stdout
    summary = [line for line in r.stdout.splitlines() if line.startswith("Evacuation to ")]
    assert len(summary) == 1 and summary[0].endswith(" not moved")
    host = a if daemon == "srcd" else b
    proc = host.srcd if daemon == "srcd" else host.dstd
    assert proc is not None
    assert proc.proc.wait(timeout=30) == 137
    if daemon == "srcd":
        a.start_srcd()
    else:
        b.start_dstd()
    settled(a, b, timeout=90)
    wait_until(lambda: len(a.names()) + len(b.names()) == MANY, 30, "every domain settled")
    # where each ended depends on where the crash cut it (recovery finishes those whose
    # Finish had succeeded): the point is one owner each
    _one_owner_each(a, b, names)
    r = a.migctl("evacuate", "--offline", b.dst, check=False, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert a.names() == [] and sorted(b.names()) == sorted(names)
    assert a.journal() == [] and b.journal() == []
