"""The real Linux guest (helpers/guest.py) run and moved by vmmigrate's daemons through migctl.

The daemons start QEMU from the guest's domain XML (helpers/guestvm.py); the guest counts on
its console (kept in the domain's console log on each host) and on its disk. A migration is
good when the count goes on, on the destination, from where it stopped on the source (the two
logs together count on without a gap or a restart), the disk's newest record is newer than the
source's last count and nothing on it is torn, and the domain runs on the destination only.

Both hosts are on this machine, so the disk is shared storage by construction; the mount
namespace harness (helpers/mountns.py) gives each host a private view of one image path, for
the storage-copy tests (test_guest_copy.py). Timings are printed (-s) and kept as user properties.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import guest as g
from helpers import guestvm as gv
from helpers import mountns
from helpers.domains import destroy_and_undefine
from helpers.guestvm import ConsoleLog, Report
from helpers.hosts import Host, wait_until
from helpers.iproute import ip
from helpers.qmp import runtime_record
from lxml import etree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.qemu,
    pytest.mark.skipif(g.QEMU is None, reason="QEMU not installed (qemu-system-x86)"),
]

MiB = 1 << 20
MODES = {"p2p": ["--p2p"], "tunnelled": ["--p2p", "--tunnelled"], "client": []}
image = gv.image_fixture  # the fixtures image and report
report = gv.report_fixture


def migrate(
    src: Host, dst: Host, name: str, u: str, mode: str, report: Report, leg: str
) -> ConsoleLog:
    """A live migration by migctl in ``mode`` (gv.migrate_timed); returns the destination's
    console log for this run."""
    log, _ = gv.migrate_timed(src, dst, name, u, MODES[mode], report, f"{mode}_{leg}", 180)
    return log


def check_moved(src: Host, src_log: ConsoleLog, dst: Host, dst_log: ConsoleLog, name: str,
                u: str, disk: Path) -> None:  # fmt: skip
    """After a live migration: the domain runs on the destination only, the guest counted on
    there without restarting (gv.counted_on), and the disk, once the guest is paused, holds
    its newest counts, nothing torn."""
    src_last = gv.counted_on(src, src_log, dst, dst_log, name, u)
    assert name in gv.running(dst)
    dst.migctl("suspend", name)  # the guest's writes drain: the disk can be read whole
    try:
        check_disk(disk, newer_than=src_last, console_last=dst_log.counts()[-1])
    finally:
        dst.migctl("resume", name)


def check_disk(disk: Path, newer_than: int, console_last: int) -> g.Records:
    """Nothing torn; the newest record newer than ``newer_than`` and at least what the
    console last showed (a count reaches the disk before the console); the slots hold the
    last SLOTS counts of this run."""
    recs = gv.disk_records(disk)
    assert recs.torn == [], f"torn records in slots {recs.torn}"
    assert recs.newest > newer_than
    assert console_last <= recs.newest <= console_last + 1
    assert recs.counts == list(range(max(1, recs.newest - g.SLOTS + 1), recs.newest + 1))
    return recs


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_live_migration_there_and_back(
    hosts: tuple[Host, Host], image: g.Image, tmp_path: Path, domname: str, mode: str,
    report: Report,
) -> None:  # fmt: skip
    a, b = hosts
    u = str(uuidlib.uuid4())
    disk = tmp_path / "disk.raw"  # one path both hosts see: shared storage
    g.create_disk(disk, "raw", 64 * MiB)
    a.define(gv.domain_xml(domname, u, image, disk), f"{domname}.xml")
    log_a, boot = gv.start(a, domname, u)
    report(f"boot_to_first_count_{mode}", boot)
    text = log_a.text()
    assert "guest: disk vda" in text and "guest: nic eth0 52:54:00:12:34:56" in text, text
    log_a.wait_for_count(10)

    log_b = migrate(a, b, domname, u, mode, report, "there")
    check_moved(a, log_a, b, log_b, domname, u, disk)

    # back again: what the destination started (its layout, its state) is a good source
    log_a2 = migrate(b, a, domname, u, mode, report, "back")
    check_moved(b, log_b, a, log_a2, domname, u, disk)
    destroy_and_undefine(a, domname)
    assert domname not in a.names() and domname not in b.names()


def test_offline_migration_then_cold_start(
    hosts: tuple[Host, Host], image: g.Image, tmp_path: Path, domname: str, report: Report
) -> None:
    a, b = hosts
    u = str(uuidlib.uuid4())
    disk = tmp_path / "disk.raw"
    g.create_disk(disk, "raw", 64 * MiB)
    a.define(gv.domain_xml(domname, u, image, disk), f"{domname}.xml")
    log_a, _ = gv.start(a, domname, u)
    # past SLOTS counts, every slot holds a count that a new boot's first ones cannot have
    log_a.wait_for_count(g.SLOTS + 16)
    a.migctl("destroy", domname)
    before = check_disk(disk, newer_than=g.SLOTS + 15, console_last=log_a.counts()[-1])

    t0 = time.monotonic()
    a.migctl("migrate", "--offline", "--persistent", "--undefinesource", domname, b.dst)
    report("migctl_migrate_offline", time.monotonic() - t0)
    assert domname not in a.names()
    assert b.migctl("domstate", domname).stdout.strip() == "shut off"

    log_b, boot = gv.start(b, domname, u)
    report("cold_start_to_first_count", boot)
    log_b.wait_for_count(5)
    destroy_and_undefine(b, domname)
    # a new boot, counting from 1 again on its console and on its disk ...
    seen = log_b.counts()
    assert gv.START_LINE in log_b.data() and seen[0] == 1 and gv.consecutive(seen)
    after = gv.disk_records(disk)
    assert after.torn == []
    new = [c for c in after.counts if c < before.counts[0]]
    assert new == list(range(1, len(new) + 1)) and seen[-1] <= len(new) <= seen[-1] + 1
    # ... over the records of the run before, which survive in every slot it did not reach
    rewritten = {c % g.SLOTS for c in new}
    assert [c for c in after.counts if c not in new] == [
        c for c in before.counts if c % g.SLOTS not in rewritten
    ]


# ---- a mount namespace per host -----------------------------------------------------------


@pytest.fixture
def namespaces(tmp_path: Path) -> Iterator[tuple[mountns.MountNamespace, mountns.MountNamespace]]:
    reason = mountns.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    common = tmp_path / "images"
    ns_a = mountns.MountNamespace(tmp_path / "A-images", common)
    try:
        ns_b = mountns.MountNamespace(tmp_path / "B-images", common)
    except BaseException:
        ns_a.stop()
        raise
    yield ns_a, ns_b
    ns_b.stop()
    ns_a.stop()


def test_mount_namespace_gives_each_host_its_own_image_dir(
    namespaces: tuple[mountns.MountNamespace, mountns.MountNamespace], image: g.Image,
    tmp_path: Path, domname: str,
) -> None:  # fmt: skip
    ns_a, ns_b = namespaces
    marker = ns_a.common / "marker"
    ns_a.run("sh", "-c", 'echo from-A > "$1"', "sh", str(marker))
    assert ns_a.run("cat", str(marker)).stdout == "from-A\n"
    assert (ns_a.private / "marker").read_text() == "from-A\n"  # where it really is
    assert ns_b.run("cat", str(marker), check=False).returncode != 0  # B does not see it
    assert not marker.exists()  # nor does the machine's own namespace

    # host A's daemons run in A's namespace, and so does the QEMU they start: the guest's
    # disk at the common path is A's private file
    g.create_disk(ns_a.private / "disk.raw", "raw", 64 * MiB)
    a = Host("A", "127.0.0.2", tmp_path / "A", prefix=ns_a.prefix)
    try:
        a.start()
        u = str(uuidlib.uuid4())
        a.define(gv.domain_xml(domname, u, image, ns_a.common / "disk.raw"), f"{domname}.xml")
        log, _ = gv.start(a, domname, u)
        log.wait_for_count(5)
        rec = runtime_record(a.state_dir, u)
        assert rec is not None
        assert os.readlink(f"/proc/{rec['pid']}/ns/mnt") == os.readlink(f"/proc/{ns_a.pid}/ns/mnt")
        a.migctl("destroy", domname)
    finally:
        a.stop()
    check_disk(ns_a.private / "disk.raw", newer_than=4, console_last=log.counts()[-1])
    assert not (ns_a.common / "disk.raw").exists()
    assert ns_b.run("test", "-e", str(ns_a.common / "disk.raw"), check=False).returncode == 1


# ---- taps on a bridge, in a network namespace ---------------------------------------------


def fdb(netns: str, bridge: str) -> str:
    r = subprocess.run(["bridge", "-n", netns, "fdb", "show", "br", bridge], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL, check=True)  # fmt: skip
    return r.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of this test's own, with lo up and two bridges, gmbr0 and gmbr1."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bridge") is None:
        pytest.skip("needs root and iproute2 (ip, bridge) to create network namespaces")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("tap devices need /dev/net/tun")
    ns = f"guestmig-{os.getpid()}"
    r = ip("netns", "add", ns, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {r.stderr.strip()}")
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        for br in ("gmbr0", "gmbr1"):
            ip("-n", ns, "link", "add", br, "type", "bridge", "stp_state", "0")
            ip("-n", ns, "link", "set", br, "up")
        yield ns
    finally:
        left = ip("netns", "pids", ns, check=False).stdout.split()
        ip("netns", "del", ns, check=False)
        assert left == [], f"processes left in {ns}: {left}"


@pytest.mark.netns
def test_bridged_and_network_interfaces_get_taps_on_their_bridges(
    netns: str, image: g.Image, tmp_path: Path, domname: str
) -> None:
    config = tmp_path / "host.toml"
    config.write_text('networks = { gmnet = "gmbr1" }\n')
    host = Host("T", "127.0.0.2", tmp_path / "T", prefix=["ip", "netns", "exec", netns])
    disk = tmp_path / "disk.raw"
    g.create_disk(disk, "raw", 64 * MiB)
    u = str(uuidlib.uuid4())
    nics = (gv.bridge_nic("gmbr0"), gv.network_nic("gmnet"))
    try:
        host.start(srcd_args=["--config", str(config)], dstd_args=["--config", str(config)])
        host.define(gv.domain_xml(domname, u, image, disk, nics=nics), f"{domname}.xml")
        log, _ = gv.start(host, domname, u)
        rec = runtime_record(host.state_dir, u)
        assert rec is not None
        taps = rec["taps"]
        assert len(taps) == 2
        for tap, bridge in zip(taps, ("gmbr0", "gmbr1"), strict=True):
            detail = ip("-n", netns, "-d", "link", "show", "dev", tap).stdout
            assert f" master {bridge} " in detail and "tun type tap" in detail, detail
        live = etree.fromstring(host.migctl("dumpxml", domname).stdout.encode())
        mac = live.find("devices/interface/mac").get("address")  # type: ignore[union-attr]
        assert f"guest: nic eth0 {mac}" in log.text()
        # the guest's first frames (IPv6 neighbour discovery, once eth0 is up) reach the
        # bridge through the tap: the bridge learnt its MAC on that port
        wait_until(lambda: f"{mac} dev {taps[0]} master gmbr0" in fdb(netns, "gmbr0"),
                   timeout=30, what=f"{mac} learnt by gmbr0")  # fmt: skip
        host.migctl("destroy", domname)
        for tap in taps:
            assert ip("-n", netns, "link", "show", "dev", tap, check=False).returncode != 0
        host.migctl("undefine", domname)
    finally:
        host.stop()
