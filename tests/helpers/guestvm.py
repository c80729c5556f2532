"""The real test guest (helpers/guest.py) as a vmmigrate domain: its XML, and what it left on
a host's console log and on its disk.

The daemons start QEMU from the XML (common/qemuargv.py): direct kernel boot, a virtio disk, a
virtio NIC, the serial console kept in the domain's console log, which sits beside its QMP
socket (``<socket>.console.log``, common/hypervisor.py qemu_facts). QEMU appends to that log
(logappend=on), so a domain that comes back to a host adds to what it wrote there before:
:class:`ConsoleLog` reads from an offset taken when it was made.
"""

from __future__ import annotations

import json
import re
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest
from helpers import guest as g
from helpers.hosts import Host, wait_until
from helpers.qmp import runtime_record
from vmmigrate.common.hypervisor import socket_dir_for

Report = Callable[[str, float], None]

CMDLINE = "console=ttyS0 quiet panic=-1"
COUNT_LINE = re.compile(rb"count (\d+)\r?")
START_LINE = b"guest: start"


def image_or_skip() -> g.Image:
    """The guest's kernel and initramfs (and qemu-img for its disks), or a skip saying why
    they cannot be had here."""
    try:
        img = g.image()
        g.qemu_img()
    except g.GuestUnavailable as e:
        pytest.skip(f"the test guest cannot be had here: {e}")
    return img


def timing_reporter(record_property: Callable[[str, object], None]) -> Report:
    """``report(name, seconds)``: kept as the test's user property and printed (-s)."""

    def put(name: str, seconds: float) -> None:
        record_property(name, round(seconds, 3))
        print(f"\n[guest timing] {name}: {seconds:.3f} s")

    return put


# The guest tests' fixtures: a test module takes them by name, ``image = gv.image_fixture``
# and ``report = gv.report_fixture`` (pytest finds a fixture among a module's names).


@pytest.fixture(scope="module", name="image")
def image_fixture() -> g.Image:
    """The guest (image_or_skip), once per module."""
    return image_or_skip()


@pytest.fixture(name="report")
def report_fixture(record_property: Callable[[str, object], None]) -> Report:
    """The test's timing_reporter."""
    return timing_reporter(record_property)


def user_nic(mac: str = "52:54:00:12:34:56") -> str:
    """A virtio NIC on QEMU's user networking (the guest brings eth0 up, with no address)."""
    return f"<interface type='user'><mac address='{mac}'/><model type='virtio'/></interface>"


def bridge_nic(bridge: str) -> str:
    return (
        f"<interface type='bridge'><source bridge={quoteattr(bridge)}/>"
        "<model type='virtio'/></interface>"
    )


def network_nic(network: str) -> str:
    return (
        f"<interface type='network'><source network={quoteattr(network)}/>"
        "<model type='virtio'/></interface>"
    )


def domain_xml(
    name: str,
    uuid: str,
    img: g.Image,
    disk: Path,
    nics: tuple[str, ...] = (user_nic(),),
    memory_mib: int = 256,
    fmt: str = "raw",
) -> str:
    """The guest as a domain: TCG (type 'qemu'), q35, direct kernel boot, 256 MiB, a virtio
    disk of format ``fmt`` (raw or qcow2) with cache='none' (the migration safety check passes
    on shared storage), the given NICs, a serial console; a reboot (the kernel panics with
    panic=-1) ends it."""
    assert g.QEMU is not None
    devices = "\n    ".join(nics)
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(img.vmlinuz))}</kernel>
    <initrd>{escape(str(img.initrd))}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{escape(g.QEMU)}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type={quoteattr(fmt)} cache='none'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {devices}
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
"""


def console_log_path(host: Host, uuid: str) -> Path:
    """The domain's console log on ``host``: beside its QMP socket, in the host's socket
    directory (the run dir, or a directory under the temp dir when that path is too long
    for a unix socket), whether the domain runs there yet or not."""
    return socket_dir_for(host.state_dir / "run") / f"{uuid}.console.log"


@dataclass
class ConsoleLog:
    """What one run of the domain on one host printed: the log from ``offset`` on."""

    path: Path
    offset: int = 0
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def from_now(cls, host: Host, uuid: str) -> ConsoleLog:
        """The domain's log on ``host`` from its current end: what the next run there (or
        the one running now) prints from here on (a run that comes back to a host appends
        to the earlier one's output)."""
        path = console_log_path(host, uuid)
        return cls(path, path.stat().st_size if path.exists() else 0)

    def data(self) -> bytes:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def text(self) -> str:
        return self.data().decode(errors="replace")

    def counts(self) -> list[int]:
        return counts(self.data())

    def wait_for_count(self, at_least: int, timeout: float = 60.0) -> float:
        """Seconds since this log was made when it first showed a count >= at_least."""
        return g.wait_for_count(self.counts, self.data, at_least, timeout, self.started,
                                str(self.path))  # fmt: skip


def counts(data: bytes) -> list[int]:
    """The counts of the complete "count N" lines (a line cut by the end of the data, as a
    source's log may be at the switch-over, is not one)."""
    lines = data.split(b"\n")[:-1]  # the last piece has no newline yet (or is empty)
    return [int(m.group(1)) for line in lines if (m := COUNT_LINE.fullmatch(line))]


def consecutive(seen: list[int]) -> bool:
    return bool(seen) and seen == list(range(seen[0], seen[0] + len(seen)))


def disk_records(disk: Path) -> g.Records:
    return g.disk_records(disk, "raw")


# ---- the guest run and moved by migctl ------------------------------------------------------


def running(host: Host) -> list[str]:
    return host.migctl("list", "--name").stdout.split()


def start(host: Host, name: str, u: str) -> tuple[ConsoleLog, float]:
    """``migctl start`` the defined domain; returns its console log on ``host`` and the
    seconds from the start call to the first count."""
    log = ConsoleLog.from_now(host, u)
    host.migctl("start", name)
    return log, log.wait_for_count(1)


def source_job(src: Host, u: str, mid: str) -> dict[str, Any]:
    """The source's history record of migration ``mid`` (``migctl jobs``)."""
    found: list[dict[str, Any]] = []

    def look() -> bool:
        jobs = json.loads(src.migctl("jobs", "--domain", u, "--json").stdout)
        found[:] = [j for j in jobs if j["migration_id"] == mid and j["role"] == "source"]
        return bool(found)

    wait_until(look, timeout=30, what=f"the source's history record of {mid}")
    return found[0]


def migrate_timed(
    src: Host, dst: Host, name: str, u: str, flags: Sequence[str], report: Report, tag: str,
    timeout: float,
) -> tuple[ConsoleLog, str]:  # fmt: skip
    """A live migration by migctl with ``flags`` (the domain defined on the destination,
    undefined on the source); returns the destination's console log for this run and the
    migration's id. Reports migctl's wall time and, from the source's history of the job,
    its duration and the guest's downtime (names ending in ``_<tag>``)."""
    log = ConsoleLog.from_now(dst, u)
    mid = str(uuidlib.uuid4())
    t0 = time.monotonic()
    src.migctl("migrate", "--live", "--persistent", "--undefinesource", *flags,
               "--migration-id", mid, name, dst.dst, timeout=timeout)  # fmt: skip
    report(f"migctl_migrate_{tag}", time.monotonic() - t0)
    job = source_job(src, u, mid)
    assert job["result"] == "completed" and job["bytes"] > 0, job
    report(f"job_elapsed_{tag}", job["ended_unix"] - job["started_unix"])
    report(f"job_downtime_{tag}", job["downtime_ms"] / 1000)
    return log, mid


def counted_on(src: Host, src_log: ConsoleLog, dst: Host, dst_log: ConsoleLog, name: str,
               u: str) -> int:  # fmt: skip
    """After a live migration: the domain runs on the destination only, and the guest
    counted on there without restarting (the two logs are one stream of counts). Returns
    the source's last count."""
    assert name not in running(src) and name not in src.names()
    assert runtime_record(src.state_dir, u) is None
    assert dst.migctl("domstate", name).stdout.strip() == "running"
    src_seen = src_log.counts()  # final: the source's QEMU is gone
    dst_log.wait_for_count(src_seen[-1] + 10)
    assert START_LINE not in dst_log.data(), "the guest booted again on the destination"
    # the first whole line there is the next count, or the one after when the switch-over
    # cut a line in two; the two logs together are one stream, with no count lost or repeated
    assert src_seen[-1] + 1 <= dst_log.counts()[0] <= src_seen[-1] + 2
    both = counts(src_log.data() + dst_log.data())
    assert consecutive(both) and both[0] == src_seen[0], (both[:3], both[-3:])
    return src_seen[-1]
