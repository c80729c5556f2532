"""A storage copy given up shuts its NBD connections down (QMP yank) before its nodes go:
a destination cut off leaves the mirror's writes hanging, and blockdev-del of such a node
blocks the source QEMU's main loop (docs/ARCHITECTURE.md section 14). The real thing is in
tests/integration/test_guest_copy.py (the link cut); here, the order of the QMP commands."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from vmmigrate.common.qmp import QMPExecuteError
from vmmigrate.srcd.mirror import Mirrors, release_leftovers, yank_nbd
from vmmigrate.srcd.storage import CopiedDisk

VDA = CopiedDisk("vda", 32 << 20, "libvirt-1-format", "drive-virtio-disk0")
VDB = CopiedDisk("vdb", 16 << 20, "libvirt-2-format", "drive-virtio-disk1")
NODES = ["migration-vda-storage", "migration-vdb-storage"]


class FakeMonitor:
    """Records the commands; the mirror jobs conclude once cancelled; ``refuse`` names
    commands answered with a QMP error."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.refuse = refuse
        self.jobs = {c.export: "running" for c in (VDA, VDB)}

    async def execute(self, command: str, arguments: Any = None, timeout: float = 10) -> Any:
        self.sent.append((command, arguments))
        if command in self.refuse:
            raise QMPExecuteError(
                {"execute": command}, {"error": {"class": "CommandNotFound", "desc": command}}
            )
        if command == "block-job-cancel":
            self.jobs[arguments["device"]] = "concluded"
        if command == "query-jobs":
            return [{"id": i, "type": "mirror", "status": s} for i, s in self.jobs.items()]
        if command == "query-named-block-nodes":
            return [{"node-name": n} for n in [*NODES, "libvirt-1-format"]]
        return {}

    def names(self) -> list[str]:
        return [c for c, _ in self.sent]


def aborted(mon: FakeMonitor) -> None:
    job = SimpleNamespace(copies=(VDA, VDB), migration_id="m1", mirror={})
    mirrors = Mirrors(SimpleNamespace(), job, {})  # type: ignore[arg-type]
    mirrors._mon = mon  # type: ignore[assignment]
    mirrors.jobs = [VDA.export, VDB.export]
    mirrors.nodes = list(NODES)
    asyncio.run(mirrors.abort())


def test_abort_yanks_the_nbd_connections_before_removing_their_nodes() -> None:
    mon = FakeMonitor()
    aborted(mon)
    names = mon.names()
    yank = ("yank", {"instances": [{"type": "block-node", "node-name": n} for n in NODES]})
    assert yank in mon.sent
    assert names.index("yank") > max(i for i, n in enumerate(names) if n == "block-job-cancel")
    assert names.index("yank") < names.index("job-dismiss") < names.index("blockdev-del")
    assert [a for c, a in mon.sent if c == "blockdev-del"] == [{"node-name": n} for n in NODES]


def test_an_emulator_without_yank_is_released_as_before() -> None:
    mon = FakeMonitor(refuse=("yank",))
    aborted(mon)  # the refusal is logged, not raised
    assert [a for c, a in mon.sent if c == "blockdev-del"] == [{"node-name": n} for n in NODES]


def test_nothing_to_yank_sends_nothing() -> None:
    mon = FakeMonitor()
    asyncio.run(yank_nbd(mon.execute, []))
    assert mon.sent == []


def test_recovery_yanks_the_leftover_nodes_before_removing_them() -> None:
    mon = FakeMonitor()
    hv = SimpleNamespace(execute=lambda uuid, *a, **k: mon.execute(*a, **k))
    assert asyncio.run(release_leftovers(hv, "u1")) == 2  # type: ignore[arg-type]
    names = mon.names()
    yanked = next(a for c, a in mon.sent if c == "yank")
    assert [i["node-name"] for i in yanked["instances"]] == NODES  # not the disk's own node
    assert names.index("yank") < names.index("blockdev-del")
    assert [a for c, a in mon.sent if c == "blockdev-del"] == [{"node-name": n} for n in NODES]


class ReadyMonitor(FakeMonitor):
    """Mirrors in step, the last look still counting what the guest wrote just before its
    pause (QEMU flushes it as the ready job completes)."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs = {c.export: "ready" for c in (VDA, VDB)}

    async def execute(self, command: str, arguments: Any = None, timeout: float = 10) -> Any:
        got = await super().execute(command, arguments, timeout)
        if command == "query-jobs":
            for j in got:
                j.update({"total-progress": 1 << 20, "current-progress": (1 << 20) - 65536})
        return got


def test_a_copy_completed_in_step_reports_nothing_remaining() -> None:
    job = SimpleNamespace(copies=(VDA, VDB), migration_id="m1", mirror={})
    mirrors = Mirrors(SimpleNamespace(), job, {})  # type: ignore[arg-type]
    mon = ReadyMonitor()
    mirrors._mon = mon  # type: ignore[assignment]
    mirrors.jobs = [VDA.export, VDB.export]
    mirrors.nodes = list(NODES)
    asyncio.run(mirrors.complete())
    assert job.mirror == {"total": 2 << 20, "transferred": 2 << 20, "remaining": 0}
    assert mon.names().count("block-job-cancel") == 2
