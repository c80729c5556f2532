"""The real test guest (helpers/guest.py) as a vmmigrate domain: its XML, and what it left on
a host's console log and on its disk.

The daemons start QEMU from the XML (common/qemuargv.py): direct kernel boot, a virtio disk, a
virtio NIC, the serial console kept in the domain's console log, which sits beside its QMP
socket (``<socket>.console.log``, common/hypervisor.py qemu_facts). QEMU appends to that log
(logappend=on), so a domain that comes back to a host adds to what it wrote there before:
:class:`ConsoleLog` reads from an offset taken when it was made.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from helpers import guest as g
from helpers.hosts import Host
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.counts()
            if seen and seen[-1] >= at_least:
                return time.monotonic() - self.started
            time.sleep(0.02)
        tail = self.data()[-1500:].decode(errors="replace")
        raise AssertionError(f"{self.path}: no count {at_least} within {timeout}s: {tail!r}")


def counts(data: bytes) -> list[int]:
    """The counts of the complete "count N" lines (a line cut by the end of the data, as a
    source's log may be at the switch-over, is not one)."""
    lines = data.split(b"\n")[:-1]  # the last piece has no newline yet (or is empty)
    return [int(m.group(1)) for line in lines if (m := COUNT_LINE.fullmatch(line))]


def consecutive(seen: list[int]) -> bool:
    return bool(seen) and seen == list(range(seen[0], seen[0] + len(seen)))


def disk_records(disk: Path) -> g.Records:
    return g.disk_records(disk, "raw")
