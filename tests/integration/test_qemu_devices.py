"""QEMU guests with devices, through the daemons: the command line comes from the domain XML
(common/qemuargv.py), the live XML shows the layout decided at start, and the same layout
runs on the destination after a live migration. Disk files are made by the test, on one
path both hosts see (shared storage on one machine)."""

from __future__ import annotations

import os
import shutil
import uuid as uuidlib
from pathlib import Path

import pytest
from helpers.domains import destroy_and_undefine
from helpers.hosts import Host
from helpers.qmp import pci_layout, qmp_for, runtime_record
from lxml import etree

from tests.unit.test_qemuargv import DATA, write_qcow2

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="QEMU not installed"),
]


def guest_xml(golden: str, name: str, u: str, images: Path) -> str:
    """A virt-install-like golden as a runnable guest here: this host's QEMU, disks in
    ``images``, user networking (no bridge on a test host), 256 MiB."""
    root = etree.fromstring((DATA / f"{golden}.xml").read_bytes())
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = u  # type: ignore[union-attr]
    root.find("devices/emulator").text = QEMU  # type: ignore[union-attr]
    mem = root.find("memory")
    assert mem is not None
    mem.set("unit", "MiB")
    mem.text = "256"
    current = root.find("currentMemory")
    if current is not None:
        root.remove(current)
    for i, disk in enumerate(root.iterfind("devices/disk")):
        src = disk.find("source")
        if src is None:
            continue
        driver = disk.find("driver")
        path = images / f"{name}-{i}.img"
        if driver is not None and driver.get("type") == "qcow2":
            write_qcow2(path, 64 << 20)
        else:
            with path.open("wb") as f:
                f.truncate(64 << 20)
        src.set("file", str(path))
    for g in root.iterfind("devices/graphics"):
        g.attrib.pop("port", None)  # two QEMUs on one machine: each picks its own port
        g.set("autoport", "yes")
    for nic in root.iterfind("devices/interface"):
        nic.set("type", "user")
        for child in nic.findall("source"):
            nic.remove(child)
    return etree.tostring(root, encoding="unicode")


def live_root(host: Host, name: str) -> etree._Element:
    return etree.fromstring(host.migctl("dumpxml", name).stdout.encode())


def _all_disks_cache_safe(root: etree._Element) -> bool:
    return all(d.get("cache") in ("none", "directsync") for d in root.iterfind("devices/disk/driver"))


@pytest.mark.parametrize("golden", ["server-q35", "desktop-q35", "legacy-pc"])
def test_virt_install_guest_starts_and_migrates_live(
    hosts: tuple[Host, Host], domname: str, golden: str, tmp_path: Path
) -> None:
    a, b = hosts
    u = str(uuidlib.uuid4())
    xml = guest_xml(golden, domname, u, tmp_path)
    a.define(xml, f"{domname}.xml")
    a.migctl("start", domname)
    rec = runtime_record(a.state_dir, u)
    assert rec is not None and rec["emulator"] == "qemu"
    argv = rec["argv"]
    assert "-blockdev" in argv and "libvirt-1-format" in " ".join(argv)
    # the live XML carries the layout decided at start; the definition stays as written
    live = live_root(a, domname)
    placed = {(ad.get("bus"), ad.get("slot"), ad.get("function"))
              for ad in live.iterfind("devices/*/address[@type='pci']")}
    assert placed and live.find("devices/interface/mac") is not None
    inactive = etree.fromstring(a.migctl("dumpxml", "--inactive", domname).stdout.encode())
    written = etree.fromstring(xml.encode())
    assert len(inactive.findall("devices/*/address")) == len(written.findall("devices/*/address"))
    with qmp_for(a.state_dir, u) as q:
        assert q.cmd("query-status")["status"] == "running"
        source_pci = pci_layout(q)
    # the desktop and the older guest keep virt-install's cache modes (default, writeback):
    # libvirt's safety check refuses those without --unsafe, and so do we (the disks are
    # shared here by construction: both hosts are on this machine)
    unsafe = [] if _all_disks_cache_safe(written) else ["--unsafe"]
    a.migctl("migrate", "--live", "--persistent", "--undefinesource", "--p2p", *unsafe, domname,
             b.dst, timeout=180)
    assert b.migctl("domstate", domname).stdout.strip() == "running"
    # the destination ran the same layout: its live XML and QEMU's own PCI view match
    moved = live_root(b, domname)
    assert {(ad.get("bus"), ad.get("slot"), ad.get("function"))
            for ad in moved.iterfind("devices/*/address[@type='pci']")} == placed
    with qmp_for(b.state_dir, u) as q:
        assert q.cmd("query-status")["status"] == "running"
        assert pci_layout(q) == source_pci
    destroy_and_undefine(b, domname)


def test_unsupported_element_is_refused_with_nothing_started(
    hosts: tuple[Host, Host], domname: str, tmp_path: Path
) -> None:
    a, _ = hosts
    u = str(uuidlib.uuid4())
    xml = guest_xml("legacy-pc", domname, u, tmp_path).replace(
        "</devices>", "<sound model='ich9'/></devices>"
    )
    path = tmp_path / f"{domname}.xml"
    path.write_text(xml)
    r = a.migctl("define", str(path), check=False)
    assert r.returncode == 1
    assert "unsupported configuration: device <sound> is not supported" in r.stderr
    assert domname not in a.names()
    assert runtime_record(a.state_dir, u) is None


def cpus_allowed(pid: int) -> dict[str, str]:
    """Cpus_allowed_list of each thread of ``pid`` (thread id -> list)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        out[task.name] = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                              if line.startswith("Cpus_allowed_list:"))
    return out


def test_tuning_attributes_hold_on_both_hosts(
    hosts: tuple[Host, Host], domname: str, tmp_path: Path
) -> None:
    """The tuned golden through the daemons: <vcpu cpuset='0'> confines every thread of the
    emulator to host CPU 0, <memballoon><stats period='5'> is the balloon's polling interval
    and <driver queues='2'> virtio-scsi's, on the source and, after a live migration, on
    the destination (whose QEMU is built from the live XML)."""
    a, b = hosts
    u = str(uuidlib.uuid4())
    xml = guest_xml("tuned-q35", domname, u, tmp_path)
    a.define(xml, f"{domname}.xml")
    a.migctl("start", domname)
    for host in (a, b):
        rec = runtime_record(host.state_dir, u)
        assert rec is not None
        threads = cpus_allowed(rec["pid"])
        assert len(threads) > 1 and set(threads.values()) == {"0"}, threads
        with qmp_for(host.state_dir, u) as q:
            interval = q.cmd("qom-get", path="/machine/peripheral/balloon0",
                             property="guest-stats-polling-interval")
            assert interval == 5
            assert q.cmd("qom-get", path="/machine/peripheral/scsi0",
                         property="num_queues") == 2
            assert q.cmd("query-status")["status"] == "running"
        if host is a:
            a.migctl("migrate", "--live", "--persistent", "--undefinesource", "--p2p",
                     "--unsafe", domname, b.dst, timeout=180)
    destroy_and_undefine(b, domname)


def test_a_cpuset_naming_no_cpu_of_the_host_is_refused_before_the_start(
    hosts: tuple[Host, Host], domname: str, tmp_path: Path
) -> None:
    a, _ = hosts
    u = str(uuidlib.uuid4())
    missing = os.cpu_count() or 1  # CPUs are numbered from 0: this one is not there
    xml = guest_xml("minimal", domname, u, tmp_path).replace(
        "<vcpu>1</vcpu>", f"<vcpu cpuset='{missing}'>1</vcpu>"
    )
    a.define(xml, f"{domname}.xml")
    r = a.migctl("start", domname, check=False)
    assert r.returncode == 1
    assert f"host CPU {missing} named by <vcpu cpuset> is not online on this host" in r.stderr
    assert runtime_record(a.state_dir, u) is None
