"""An emulator that goes without being asked is reported once (QMPHypervisor.on_gone, which
the daemons turn into Stopped Failed or Stopped Shutdown), by its owner with its exit status,
or by another daemon once the owner is gone; one stopped on purpose is never reported.
Real simvm emulators; two drivers on one run directory stand for a host's two daemons."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from vmmigrate.common import events
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import OperationFailed
from vmmigrate.common.hypervisor import (
    EmulatorExit,
    EmulatorSettings,
    QMPHypervisor,
    RuntimeRecord,
    process_alive,
)

UUID = "0b7c1f7e-3d5a-4c1e-9f2b-6a8d4e2c1b90"
XML = f"""<domain type='kvm'>
  <name>gone</name>
  <uuid>{UUID}</uuid>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
"""

Reports = list[tuple[str, str, EmulatorExit]]


def _driver(run_dir: Path, reports: Reports, who: str) -> QMPHypervisor:
    hv = QMPHypervisor(run_dir, EmulatorSettings(default="simvm"))
    hv.on_gone = lambda rec, how: reports.append((who, rec.uuid, how))
    return hv


async def _until_dead(rec: RuntimeRecord) -> None:
    for _ in range(1000):
        if not process_alive(rec):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the emulator did not die")


def _run(
    tmp_path: Path, scenario: Callable[[QMPHypervisor, QMPHypervisor, DomainDef, Reports], Awaitable[None]]
) -> Reports:
    """Run ``scenario`` with an owner driver (``a``, which starts the emulator) and another
    one (``b``) on the same run directory; the emulator never outlives it."""
    reports: Reports = []
    a = _driver(tmp_path / "run", reports, "a")
    b = _driver(tmp_path / "run", reports, "b")
    d = parse_domain(XML)

    async def main() -> None:
        try:
            await a.start(d)
            await scenario(a, b, d, reports)
        finally:
            for hv in (a, b):
                hv.on_gone = None  # the test's own clean-up is not what it looks at
                for child in list(hv._children.values()):
                    child.proc.kill()
                    child.proc.wait()
                hv.reap()
                await hv.close()

    asyncio.run(main())
    return reports


def test_a_killed_emulator_is_reported_once_by_its_owner(tmp_path: Path) -> None:
    async def scenario(a: QMPHypervisor, b: QMPHypervisor, d: DomainDef, reports: Reports) -> None:
        rec = a.record(d.uuid)
        assert rec is not None and rec.owner_pid == os.getpid()
        os.kill(rec.pid, signal.SIGKILL)
        await _until_dead(rec)
        # the other daemon sees it gone, and leaves it to its owner, who is alive
        assert b.record(d.uuid) is None and reports == []
        assert a._load(d.uuid) is not None  # the record waits for the owner
        a.reap()
        assert b.record(d.uuid) is None and a.record(d.uuid) is None
        a.reap()

    reports = _run(tmp_path, scenario)
    assert [(who, uuid) for who, uuid, _ in reports] == [("a", UUID)]
    how = reports[0][2]
    assert how.returncode == -signal.SIGKILL and not how.clean
    assert how.describe() == "killed by SIGKILL"
    assert events.stopped_unasked(how.clean) == events.STOPPED_FAILED
    assert not list((tmp_path / "run").glob("*.json"))


def test_an_emulator_that_exits_cleanly_is_a_shutdown(tmp_path: Path) -> None:
    """Exit status 0 without being asked (QEMU: the guest powered off)."""

    async def scenario(a: QMPHypervisor, b: QMPHypervisor, d: DomainDef, reports: Reports) -> None:
        rec = a.record(d.uuid)
        assert rec is not None
        with contextlib.suppress(OperationFailed):  # it may go before it answers
            await a.execute(d.uuid, "quit", timeout=5)  # not through a.quit(): unasked
        await _until_dead(rec)
        assert a.record(d.uuid) is None

    reports = _run(tmp_path, scenario)
    assert len(reports) == 1
    how = reports[0][2]
    assert how.returncode == 0 and how.clean
    assert events.stopped_unasked(how.clean) == events.STOPPED_SHUTDOWN


@pytest.mark.parametrize("stopper", ["a", "b"])
@pytest.mark.parametrize("how", ["kill", "quit", "stop_migrated"])
def test_an_emulator_stopped_on_purpose_is_not_reported(tmp_path: Path, stopper: str, how: str) -> None:
    """By its owner or by the other daemon, whichever of them notices the end first."""

    async def scenario(a: QMPHypervisor, b: QMPHypervisor, d: DomainDef, reports: Reports) -> None:
        hv = a if stopper == "a" else b
        rec = a.record(d.uuid)
        assert rec is not None
        await getattr(hv, how)(d.uuid)
        await _until_dead(rec)
        a.reap()
        b.reap()
        assert a.record(d.uuid) is None and b.record(d.uuid) is None

    assert _run(tmp_path, scenario) == []


@pytest.mark.parametrize("stopper", ["a", "b"])
def test_a_migrated_source_is_shut_off_once_killed(tmp_path: Path, stopper: str) -> None:
    """Confirm's stop: SIGKILL, and the domain reads as shut off at once on both daemons
    (record, sockets and stop mark gone), while the kernel may still be freeing the
    emulator; its parent collects it later without reporting it."""

    async def scenario(a: QMPHypervisor, b: QMPHypervisor, d: DomainDef, reports: Reports) -> None:
        rec = a.record(d.uuid)
        assert rec is not None
        await (a if stopper == "a" else b).stop_migrated(d.uuid)
        assert a.record(d.uuid) is None and b.record(d.uuid) is None
        left = {p.name for p in (tmp_path / "run").glob(f"{d.uuid}.*")}
        assert left <= {f"{d.uuid}.log"}  # the emulator's log stays, as after any stop
        await _until_dead(rec)  # SIGKILL: it never runs again
        await a.stop_migrated(d.uuid)  # again: nothing left to do
        a.reap()

    assert _run(tmp_path, scenario) == []


def test_the_owner_noticing_first_a_stop_the_other_asked_for(tmp_path: Path) -> None:
    """The other daemon marked it and killed it; the owner collects it before the other
    one has settled its record: the mark says it was asked for."""

    async def scenario(a: QMPHypervisor, b: QMPHypervisor, d: DomainDef, reports: Reports) -> None:
        rec = b.record(d.uuid)
        assert rec is not None
        b._mark_stopping(rec)
        os.kill(rec.pid, signal.SIGKILL)
        await _until_dead(rec)
        a.reap()
        assert a._load(d.uuid) is None
        assert not (tmp_path / "run" / f"{UUID}.stopping").exists()
        b.forget(rec)  # what b's kill() does once it sees it gone: nothing left to do

    assert _run(tmp_path, scenario) == []


def _dead_pid() -> tuple[int, int]:
    """A pid and start ticks that name no running process (a daemon that is gone)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid, 12345


def test_an_orphan_is_settled_by_whichever_daemon_looks_first(tmp_path: Path) -> None:
    """Its owner is gone (the daemon restarted): the other daemon reports it, without an
    exit status, as libvirt does: no SHUTDOWN event seen, so it failed."""

    async def scenario(a: QMPHypervisor, b: QMPHypervisor, d: DomainDef, reports: Reports) -> None:
        rec = a.record(d.uuid)
        assert rec is not None
        pid, ticks = _dead_pid()
        orphan = dataclasses.replace(rec, owner_pid=pid, owner_ticks=ticks)
        (tmp_path / "run" / f"{UUID}.json").write_bytes(orphan.to_json())
        os.kill(rec.pid, signal.SIGKILL)
        await _until_dead(rec)
        b.sweep(every=0)
        assert b.record(d.uuid) is None
        a.reap()  # the zombie is collected; its record is settled already: nothing more

    reports = _run(tmp_path, scenario)
    assert [(who, how.returncode, how.clean) for who, _, how in reports] == [("b", None, False)]


def test_a_start_settles_a_record_its_owner_has_not_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous emulator is gone but its owner (alive, busy) has not settled its
    record yet: a start waits for it a moment, then settles it itself (its end reported
    once, its files cleaned) before the new emulator takes the domain's sockets."""
    from vmmigrate.common import hypervisor

    monkeypatch.setattr(hypervisor, "SETTLE_WAIT", 0.2)
    owner = subprocess.Popen(["sleep", "60"])

    async def scenario(a: QMPHypervisor, b: QMPHypervisor, d: DomainDef, reports: Reports) -> None:
        rec = a.record(d.uuid)
        assert rec is not None
        ticks = hypervisor._start_ticks(owner.pid)
        assert ticks is not None
        moved = dataclasses.replace(rec, owner_pid=owner.pid, owner_ticks=ticks)
        (tmp_path / "run" / f"{UUID}.json").write_bytes(moved.to_json())
        os.kill(rec.pid, signal.SIGKILL)
        await _until_dead(rec)
        assert b.record(d.uuid) is None and reports == []  # left to its (busy) owner
        new = await b.start(d)
        assert new.pid != rec.pid and b.record(d.uuid) == new
        a.reap()  # the old child is collected: its record is not its own any more
        assert a.record(d.uuid) == new

    try:
        reports = _run(tmp_path, scenario)
    finally:
        owner.kill()
        owner.wait()
    assert [(who, how.returncode) for who, _, how in reports] == [("b", None)]


def test_a_failed_start_is_not_a_stopped_domain(tmp_path: Path) -> None:
    """The emulator dies while start() still waits for it (here: its first command): the
    start fails with its error, and the housekeeping that runs meanwhile reports nothing."""
    reports: Reports = []
    a = _driver(tmp_path / "run", reports, "a")
    d = parse_domain(XML)

    async def dies(dom: DomainDef, rec: RuntimeRecord) -> None:
        os.kill(rec.pid, signal.SIGKILL)
        await _until_dead(rec)
        a.reap()
        assert a.record(dom.uuid) is None
        raise OperationFailed("the emulator died while starting")

    a._initial_memory = dies  # type: ignore[method-assign]

    async def main() -> None:
        with pytest.raises(OperationFailed):
            await a.start(d)
        a.reap()
        await a.close()

    asyncio.run(main())
    assert reports == []
    assert not list((tmp_path / "run").glob("*.json"))


def test_how_an_emulator_ended_is_described() -> None:
    assert EmulatorExit(1).describe() == "exited with status 1"
    assert not EmulatorExit(1).clean
    assert EmulatorExit(None, shutdown_seen=True).clean
    assert "without a SHUTDOWN event" in EmulatorExit(None).describe()
    assert not EmulatorExit(None).clean
