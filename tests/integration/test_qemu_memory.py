"""<currentMemory> below <memory> on real QEMU, through the daemons: QEMU runs with all of
<memory> and the balloon's target is set to <currentMemory> once it has started, as libvirt
does; `dominfo`'s "Used memory" is what the balloon holds (QMP query-balloon's ``actual``).
An incoming migration sets no target: the balloon's state arrives with the guest's.

Without a guest balloon driver ``actual`` never moves, and QEMU has no command that reads
the target back; so the first test checks what is observable then (the start, which fails
if QEMU refuses the ``balloon`` command, the live XML, query-balloon, dominfo), and the
second boots the real Linux guest of tests/helpers/guest.py, whose balloon driver gives the
memory back, so that ``actual`` reaching <currentMemory> shows the target was set."""

from __future__ import annotations

import shutil
import uuid as uuidlib
from pathlib import Path

import pytest
from helpers import guest as g
from helpers.hosts import Host, wait_until
from helpers.qmp import qmp_for
from lxml import etree

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="QEMU not installed"),
]
MiB = 1 << 20


def memory_xml(name: str, u: str, current_mib: int, balloon: str, extra: str = "") -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{u}</uuid>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='MiB'>{current_mib}</currentMemory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{extra}</os>
  <devices>
    <emulator>{QEMU}</emulator>
    {balloon}
  </devices>
</domain>"""


def dominfo(host: Host, name: str) -> dict[str, str]:
    out = host.migctl("dominfo", name).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def current_memory(xml: str) -> tuple[str | None, str | None]:
    el = etree.fromstring(xml.encode()).find("currentMemory")
    assert el is not None
    return el.text, el.get("unit")


def balloon_actual(host: Host, u: str) -> int:
    with qmp_for(host.state_dir, u) as q:
        return int(q.cmd("query-balloon")["actual"])


def test_current_memory_sets_the_balloon_target_at_start(hosts: tuple[Host, Host], domname: str) -> None:
    a, _ = hosts
    u = str(uuidlib.uuid4())
    a.define(memory_xml(domname, u, 128, "<memballoon model='virtio'/>"), f"{domname}.xml")
    a.migctl("start", domname)  # it fails, the emulator stopped, if QEMU refuses `balloon`
    assert a.srcd is not None
    assert [e for e in a.srcd.events() if e.get("event") == "balloon_target_set"
            and e.get("domain") == domname and e.get("current_memory_kib") == 131072]
    # the live XML and the stored one both say what the guest may have
    assert current_memory(a.migctl("dumpxml", domname).stdout) == ("128", "MiB")
    assert current_memory(a.migctl("dumpxml", "--inactive", domname).stdout) == ("128", "MiB")
    # no guest driver here (SeaBIOS only): the balloon still holds all 256 MiB, and
    # dominfo says so, as virsh would
    assert balloon_actual(a, u) == 256 * MiB
    info = dominfo(a, domname)
    assert (info["Max memory"], info["Used memory"]) == ("262144 KiB", "262144 KiB")
    a.migctl("destroy", domname)
    assert dominfo(a, domname)["Used memory"] == "131072 KiB"  # inactive: the definition's
    a.migctl("undefine", domname)


def test_without_a_balloon_current_memory_is_named_in_a_warning(hosts: tuple[Host, Host], domname: str) -> None:
    a, _ = hosts
    u = str(uuidlib.uuid4())
    a.define(memory_xml(domname, u, 128, "<memballoon model='none'/>"), f"{domname}.xml")
    a.migctl("start", domname)
    assert a.srcd is not None
    warned = [e for e in a.srcd.events()
              if e.get("event") == "current_memory_ignored" and e.get("domain") == domname]
    assert len(warned) == 1 and warned[0]["level"] == "warning"
    # libvirt's live value: the guest has all of <memory>
    assert current_memory(a.migctl("dumpxml", domname).stdout) == ("262144", "KiB")
    assert current_memory(a.migctl("dumpxml", "--inactive", domname).stdout) == ("128", "MiB")
    assert dominfo(a, domname)["Used memory"] == "262144 KiB"
    a.migctl("destroy", domname)
    a.migctl("undefine", domname)


@pytest.fixture(scope="module")
def image() -> g.Image:
    try:
        return g.image()
    except g.GuestUnavailable as e:
        pytest.skip(f"the test guest cannot be had here: {e}")


def guest_xml(name: str, u: str, img: g.Image, disk: Path) -> str:
    boot = (f"<kernel>{img.vmlinuz}</kernel><initrd>{img.initrd}</initrd>"
            "<cmdline>console=ttyS0 quiet panic=-1</cmdline>")
    devices = f"""<disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
    <memballoon model='virtio'/>"""
    return memory_xml(name, u, 160, devices, boot)


def test_the_guest_gives_memory_back_and_keeps_its_balloon_across_a_live_migration(
    hosts: tuple[Host, Host], domname: str, image: g.Image, tmp_path: Path
) -> None:
    a, b = hosts
    u = str(uuidlib.uuid4())
    disk = tmp_path / "guest.img"
    with disk.open("wb") as f:
        f.truncate(4 * MiB)
    a.define(guest_xml(domname, u, image, disk), f"{domname}.xml")
    a.migctl("start", domname)
    # the guest's balloon driver takes what the target asks: 256 - 160 MiB
    wait_until(lambda: balloon_actual(a, u) == 160 * MiB, 300, "the guest's balloon at 160 MiB")
    assert dominfo(a, domname)["Used memory"] == f"{160 * 1024} KiB"
    # a target the definition does not know, set by hand: what the destination must keep
    with qmp_for(a.state_dir, u) as q:
        q.cmd("balloon", value=192 * MiB)
    wait_until(lambda: balloon_actual(a, u) == 192 * MiB, 300, "the guest's balloon at 192 MiB")
    a.migctl("migrate", "--live", "--persistent", "--undefinesource", "--p2p", domname, b.dst,
             timeout=300)
    assert b.migctl("domstate", domname).stdout.strip() == "running"
    # the destination set no target of its own (it would be 160 MiB, from the XML): the
    # balloon came with the guest
    assert balloon_actual(b, u) == 192 * MiB
    assert b.dstd is not None and b.srcd is not None
    assert not [e for d in (b.dstd, b.srcd) for e in d.events()
                if e.get("event") == "balloon_target_set" and e.get("domain") == domname]
    assert dominfo(b, domname)["Used memory"] == f"{192 * 1024} KiB"
    b.migctl("destroy", domname)
    b.migctl("undefine", domname)
