"""The real Linux guest (helpers/guest.py) moved by migctl with storage copy (docs/ARCHITECTURE.md
section 14): its disk is on the source host only, and the daemons copy it while it counts.

Each host runs in a mount namespace of its own (helpers/storagecopy.py): one image path, a
different file on each host. The test reads a host's files through that host's private
directory, or runs qemu-img inside the host's namespace when the image names a backing file
(by its common path). dstd allows storage copy into the image directory (--storage-dir).

A copy is checked exactly: the destination's disk is the source's disk as it was at the
switch-over (the source's QEMU is gone after it, so its disk stays so), on which the guest
then counted on. Past the guest's records the two are byte for byte equal; in the records
area every slot is equal except those the guest wrote after the switch-over, which hold the
counts after the source's newest, with none missing.

The failures (the destination's QEMU killed, the link between the hosts cut, each while the
disk copies at --bandwidth 2) must leave the guest counting on its source, running on its
own disk, and the destination with nothing: no disk (the one its dstd created is removed),
no emulator, no reservation. The link is cut between two network namespaces this module
creates (``gcopy-<pid>-A`` / ``-B``, a veth pair), removed at the end.

Timings are printed (-s) and kept as user properties.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import guest as g
from helpers import guestvm as gv
from helpers.domains import destroy_and_undefine
from helpers.guestvm import ConsoleLog, Report
from helpers.hosts import Host, settled, wait_until
from helpers.iproute import IP, ip
from helpers.qmp import pci_layout, qmp_for, runtime_record
from helpers.storagecopy import Site, copy_under_way, failed_with, sites
from lxml import etree
from vmmigrate.common.history import History

from tests.integration.test_qemu_devices import guest_xml as virt_install_xml

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.qemu,
    pytest.mark.skipif(
        g.QEMU is None or QEMU_IMG is None or QEMU_IO is None,
        reason="QEMU not installed (qemu-system-x86, qemu-utils)",
    ),
]

MiB = 1 << 20
DISK_SIZE = 128 * MiB
HEAD = g.SLOTS * g.RECORD  # the guest's records: the disk's first 32 KiB
MOVE = ("migrate", "--live", "--p2p", "--persistent", "--undefinesource")
# Copies at --bandwidth 2 (MiB/s) of a disk full of data: more than a minute, so the copy is
# surely still going when the test breaks it (the memory would copy as slowly, but it is
# never reached)
SLOW = ("--copy-storage-all", "--bandwidth", "2")
# how long a given-up mirror may take to end: srcd cancels it by force, shuts its NBD
# connection down and waits up to 30 s (srcd/mirror.py END_TIMEOUT)
MIRROR_END = 30.0
image = gv.image_fixture  # the fixtures image and report
report = gv.report_fixture


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site, Path]]:
    """A on 127.0.0.2 and B on 127.0.0.3, each seeing its own files under the images dir."""
    with sites(tmp_path_factory.mktemp("guestcopy")) as made:
        yield made


# ---- disks -----------------------------------------------------------------------------


def qemu_img(site: Site, *args: str) -> str:
    """qemu-img as ``site``'s host runs it (a backing file is found by its common path)."""
    assert QEMU_IMG is not None
    return site.run(QEMU_IMG, *args).stdout


def image_info(site: Site, path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(qemu_img(site, "info", "-U", "--output=json", str(path)))
    return info


def as_raw(site: Site, path: Path, fmt: str, out: Path) -> Path:
    """What the guest sees on ``site``'s disk at ``path`` (its backing chain included), as a
    raw file the test reads (-U: the domain may hold it, suspended: its writes flushed)."""
    qemu_img(site, "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out))
    return out


def written_on_top(site: Site, path: Path, *patterns: tuple[int, int, int]) -> None:
    """(byte, offset, length) written into the image at ``path`` (its top layer)."""
    assert QEMU_IO is not None
    writes = [a for byte, off, n in patterns for a in ("-c", f"write -P {byte:#x} {off} {n}")]
    site.run(QEMU_IO, "-f", "qcow2", *writes, str(path))


def different_mib(a: Path, b: Path) -> list[int]:
    """The MiB (by offset) past the records where two raw images of one size differ."""
    assert a.stat().st_size == b.stat().st_size, (a.stat().st_size, b.stat().st_size)
    diff = []
    with a.open("rb") as fa, b.open("rb") as fb:
        fa.seek(HEAD)
        fb.seek(HEAD)
        off = HEAD
        while chunk := fa.read(MiB):
            if chunk != fb.read(MiB):
                diff.append(off)
            off += len(chunk)
    return diff


def head(raw: Path) -> bytes:
    with raw.open("rb") as f:
        return f.read(HEAD)


def slot_count(data: bytes, slot: int) -> int:
    """The count of the valid record in ``slot`` of the records ``data``, or 0."""
    part = data[slot * g.RECORD : (slot + 1) * g.RECORD]
    return g.parse_records(bytes(slot * g.RECORD) + part).newest


def copied_then_counted(older: Path, newer: Path) -> tuple[g.Records, g.Records]:
    """``newer`` is ``older`` as it was at a switch-over (both raw), on which the guest then
    counted on: byte for byte equal past the records; in the records every slot equal,
    except those of the counts written after the switch-over (all of them, up to the SLOTS
    last ones). Nothing torn in either. Returns (older's records, newer's)."""
    assert different_mib(older, newer) == []
    old_head, new_head = head(older), head(newer)
    old, new = g.parse_records(old_head), g.parse_records(new_head)
    assert old.torn == [] and new.torn == [], (old.torn, new.torn)
    after = [c for c in new.counts if c > old.newest]
    assert after == list(range(max(old.newest + 1, new.newest - g.SLOTS + 1), new.newest + 1))
    for slot in range(g.SLOTS):
        part = slice(slot * g.RECORD, (slot + 1) * g.RECORD)
        if old_head[part] != new_head[part]:
            assert slot_count(new_head, slot) > old.newest, f"slot {slot} changed in the copy"
    return old, new


# ---- the guest on the move -------------------------------------------------------------


def migrate(
    src: Host, dst: Host, name: str, u: str, flags: Sequence[str], report: Report, leg: str
) -> tuple[ConsoleLog, dict[str, Any]]:
    """A p2p live migration by migctl with storage copy (gv.migrate_timed); returns the
    destination's console log for this run and the disks' figures (File total, ...) in the
    source's history record of the job."""
    log, mid = gv.migrate_timed(src, dst, name, u, ["--p2p", *flags], report, leg, 240)
    # domjobinfo --completed's File lines, kept in the record (migctl jobs does not show
    # them, and with --undefinesource the source has no domain left to ask)
    kept = [r for r in History(src.state_dir).list(role="source") if r.migration_id == mid]
    assert len(kept) == 1, kept
    disks: dict[str, Any] = kept[0].stats["mirror"]
    print(f"\n[guest copy] {leg}: {disks['total'] / MiB:.3f} MiB of disk copied")
    return log, disks


def check_copy(src: Site, dst: Site, disk: Path, fmt: str, last_seen: int, console_last: int,
               work: Path) -> g.Records:  # fmt: skip
    """The destination's disk (its guest paused or gone) against the source's, left as it
    was at the switch-over: see copied_then_counted. The source's newest record is the last
    count its console showed (or the next: a count reaches the disk before the console) and
    the destination's at least what its console last showed. Returns the destination's."""
    work.mkdir(parents=True, exist_ok=True)
    old = as_raw(src, disk, fmt, work / f"{src.host.name}.raw")
    new = as_raw(dst, disk, fmt, work / f"{dst.host.name}.raw")
    before, after = copied_then_counted(old, new)
    assert last_seen <= before.newest <= last_seen + 1, (last_seen, before.newest)
    assert console_last <= after.newest <= console_last + 1, (console_last, after.newest)
    old.unlink()
    new.unlink()
    return after


def disk_events(host: Host, event: str) -> list[str]:
    """The paths of the host's dstd's ``event`` (incoming_disk_created, ..._removed)."""
    assert host.dstd is not None
    return [str(e["path"]) for e in host.dstd.events() if e.get("event") == event]


def test_copy_all_there_and_copy_inc_back(
    lab: tuple[Site, Site, Path], image: g.Image, domname: str, tmp_path: Path, report: Report
) -> None:
    """The guest's disk, a qcow2 overlay on a base image both hosts have, is on A only. A to
    B with --copy-storage-all: B's dstd creates the disk (a whole copy, no backing file);
    back with --copy-storage-inc: A's overlay exists, so A uses it as it is and the mirror
    writes B's data into it. Each copy is exactly the source's disk at its switch-over, plus
    the counts written after it."""
    a, b, images = lab
    u = str(uuidlib.uuid4())
    base, disk = images / f"{domname}-base.raw", images / f"{domname}.qcow2"
    g.create_disk(a.own(base), "raw", DISK_SIZE, pattern=True)
    shutil.copyfile(a.own(base), b.own(base))  # present on both hosts
    qemu_img(a, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(disk))
    # the overlay has data of its own past the records, over the base's
    written_on_top(a, disk, (0x5C, 8 * MiB, 4 * MiB), (0xA7, DISK_SIZE - MiB, MiB))
    assert not b.own(disk).exists()
    a.host.define(gv.domain_xml(domname, u, image, disk, fmt="qcow2"), f"{domname}.xml")
    log_a, _ = gv.start(a.host, domname, u)
    log_a.wait_for_count(10)

    log_b, disks = migrate(a.host, b.host, domname, u, ["--copy-storage-all"], report, "copy_all")
    # the whole disk, and again what the guest rewrote while it copied (QEMU's progress)
    assert disks["total"] >= DISK_SIZE and disks["remaining"] == 0
    last_a = gv.counted_on(a.host, log_a, b.host, log_b, domname, u)
    assert str(disk) in disk_events(b.host, "incoming_disk_created")
    created = image_info(b, disk)  # made by B's dstd: the disk's size, its own data only
    assert (created["format"], created["virtual-size"]) == ("qcow2", DISK_SIZE)
    assert "backing-filename" not in created
    b.host.migctl("suspend", domname)  # the guest's writes drain: the disk reads whole
    try:
        at_b = check_copy(a, b, disk, "qcow2", last_a, log_b.counts()[-1], tmp_path / "there")
    finally:
        b.host.migctl("resume", domname)
    assert at_b.newest > last_a

    overlay = a.own(disk).stat().st_ino
    log_b.wait_for_count(at_b.newest + 10)
    log_a2, disks = migrate(b.host, a.host, domname, u, ["--copy-storage-inc"], report, "copy_inc")
    # B's disk has no backing file: its top is all of it that is allocated, which is
    # what the mirror copies (and again what the guest rewrote meanwhile)
    assert disks["total"] > 0 and disks["remaining"] == 0
    last_b = gv.counted_on(b.host, log_b, a.host, log_a2, domname, u)
    assert a.own(disk).stat().st_ino == overlay  # used as it was: not created again
    assert str(disk) not in disk_events(a.host, "incoming_disk_created")
    assert image_info(a, disk)["backing-filename"] == str(base)
    a.host.migctl("destroy", domname)
    at_a = check_copy(b, a, disk, "qcow2", last_b, log_a2.counts()[-1], tmp_path / "back")
    assert at_a.newest > last_b
    a.host.migctl("undefine", domname)
    assert domname not in a.host.names() and domname not in b.host.names()
    # --undefinesource leaves the storage: B keeps the copy its dstd made
    assert b.own(disk).exists()
    settled(a.host, b.host)


# ---- failures during the disk copy -------------------------------------------------------


@dataclasses.dataclass
class Copying:
    """A guest caught while its disk copies: its uuid, its disk, its console on the source,
    the running migctl."""

    u: str
    disk: Path
    log: ConsoleLog
    migration: subprocess.Popen[str]


@contextlib.contextmanager
def copying_guest(
    src: Site, dst: Site, images: Path, image: g.Image, name: str
) -> Iterator[Copying]:
    """The guest on ``src`` with a raw disk full of data there only, migrating to ``dst``
    with SLOW (libvirt gives the mirror the migration's bandwidth), caught once the copy
    has started."""
    u = str(uuidlib.uuid4())
    disk = images / f"{name}.raw"
    g.create_disk(src.own(disk), "raw", DISK_SIZE, pattern=True)
    src.host.define(gv.domain_xml(name, u, image, disk), f"{name}.xml")
    log, _ = gv.start(src.host, name, u)
    log.wait_for_count(5)
    with copy_under_way(src.host, name, *MOVE, *SLOW, name, dst.host.dst) as migration:
        assert dst.own(disk).exists()  # created by the destination's dstd
        yield Copying(u, disk, log, migration)


def failed_quietly(migration: subprocess.Popen[str], timeout: float) -> str:
    """migctl's last line, once it failed (within ``timeout``) with nothing on stdout."""
    out, last = failed_with(migration, timeout)
    assert out == "", out
    return last


def source_runs_alone(src: Site, name: str, u: str) -> bool:
    """The source runs its guest on its own disk: no mirror job, no NBD node left."""
    with qmp_for(src.host.state_dir, u) as q:
        status = q.cmd("query-status")["status"]
        jobs = q.cmd("query-jobs")
        nodes = {n["node-name"] for n in q.cmd("query-named-block-nodes", flat=True)}
    return status == "running" and jobs == [] and "migration-vda-storage" not in nodes


def counts_on_at_the_source(c: Copying, src: Site, name: str) -> None:
    """After the failure the guest goes on counting where it runs, on the source, without
    a restart: new counts on its console there, one stream since its boot."""
    assert src.host.migctl("domstate", name).stdout.strip() == "running"
    seen = c.log.counts()[-1]
    c.log.wait_for_count(seen + 10)
    assert gv.consecutive(c.log.counts()) and c.log.data().count(gv.START_LINE) == 1


def nothing_left(dst: Site, name: str, u: str, disk: Path) -> bool:
    """The destination holds nothing of the failed migration: not the disk its dstd
    created, no emulator, no reservation (journal record), no definition."""
    h = dst.host
    return (not dst.own(disk).exists() and runtime_record(h.state_dir, u) is None
            and h.journal() == [] and name not in h.names())  # fmt: skip


def test_destination_qemu_killed_during_the_disk_copy(
    lab: tuple[Site, Site, Path], image: g.Image, domname: str, report: Report
) -> None:
    a, b, images = lab
    with copying_guest(a, b, images, image, domname) as c:
        rec = runtime_record(b.host.state_dir, c.u)
        assert rec is not None
        os.kill(int(rec["pid"]), signal.SIGKILL)
        killed = time.monotonic()
        # the mirror finds its NBD connection closed at its next write: QEMU's mirror
        # writes in batches of 16 MiB, at 2 MiB/s one every 8 s (seen: 15-16 s to fail;
        # 120 s only bounds a hang)
        last = failed_quietly(c.migration, timeout=120)
        report("killed_to_failure", time.monotonic() - killed)
    assert last.startswith("error: operation failed: migration of disk vda failed"), last
    counts_on_at_the_source(c, a, domname)
    # Finish(cancelled) drops the incoming job at once: its emulator, then the disk its
    # dstd created (30 s bounds a slow machine)
    wait_until(lambda: nothing_left(b, domname, c.u, c.disk), 30, "B to drop the incoming job")
    assert str(c.disk) in disk_events(b.host, "incoming_disk_removed")
    assert source_runs_alone(a, domname, c.u)
    settled(a.host, b.host)
    destroy_and_undefine(a.host, domname)


# ---- the link cut --------------------------------------------------------------------------

# srcd's keepalive finds the destination gone within its probe interval plus the probe's
# deadline (2 + 6 s; gRPC's own keepalive gives up on a silent connection after 15 s); it
# then cancels the mirror and shuts its NBD connection down (QMP yank: its writes hang
# with the link), so the copy ends at once (seen: 10-11 s from the cut to migctl's error).
# What migctl may take, with the mirror's END_TIMEOUT and slack for a loaded machine:
CUT_TO_FAILURE = 15.0 + MIRROR_END + 15.0
# B's dstd drops an incoming job whose Finish never comes at the migration's deadline,
# capped at its own migration timeout (the source sends 600 s)
DSTD_MIGRATION_TIMEOUT = 40.0
# from the link back up until B holds nothing: srcd's Finish(cancelled) is tried for one
# rpc-timeout, while the link is still down, and not again: B drops the job at its deadline,
# counted from Prepare, before the cut (seen: 26 s after the link came back)
RECOVERED = DSTD_MIGRATION_TIMEOUT + 20.0


class Link:
    """Network namespaces ``<tag>-A`` and ``<tag>-B`` joined by a veth pair (eth0 in each,
    10.233.0.1 and 10.233.0.2: addresses that exist only inside them). Nothing is done in
    the machine's own namespace besides making and deleting the two namespaces."""

    IFACE = "eth0"

    def __init__(self, tag: str) -> None:
        self.names = {"A": f"{tag}-A", "B": f"{tag}-B"}
        self.addresses = {"A": "10.233.0.1", "B": "10.233.0.2"}
        self.made: list[str] = []

    def create(self) -> None:
        for ns in self.names.values():
            r = ip("netns", "add", ns, check=False)
            if r.returncode != 0 and not self.made:
                pytest.skip(f"cannot create a network namespace here: {r.stderr.strip()}")
            assert r.returncode == 0, r.stderr
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        a, b = self.names["A"], self.names["B"]
        ip("-n", a, "link", "add", self.IFACE, "type", "veth", "peer", "name", self.IFACE,
           "netns", b)  # fmt: skip
        for host, ns in self.names.items():
            ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", self.IFACE)
        self.set_up(True)

    def path(self, host: str) -> str:
        return f"/run/netns/{self.names[host]}"

    def state(self, ns: str) -> str:
        words = ip("-n", ns, "-o", "link", "show", "dev", self.IFACE).stdout.split()
        return words[words.index("state") + 1] if "state" in words else "UNKNOWN"

    def set_up(self, up: bool) -> None:
        """B's end up or down (A's end loses its carrier with it)."""
        for ns in self.names.values() if up else [self.names["B"]]:
            ip("-n", ns, "link", "set", self.IFACE, "up" if up else "down")
        if up:
            wait_until(lambda: all(self.state(ns) == "UP" for ns in self.names.values()), 10,
                       "the veth pair up")  # fmt: skip

    def destroy(self) -> None:
        """Delete the namespaces (the veth pair goes with them); nothing of ours may be left
        running in them (the hosts were stopped, by pid, first)."""
        left = {ns: ip("netns", "pids", ns, check=False).stdout.split() for ns in self.made}
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)
        self.made.clear()
        assert not any(left.values()), f"processes left in {left}"


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[tuple[Site, Site, Path, Link]]:
    """Hosts A and B each in a network namespace of its own (the veth pair between them is
    their only link) and in a mount namespace of its own. The addresses are not loopback:
    the daemons and migctl run --insecure (plaintext)."""
    if os.geteuid() != 0 or IP is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    link = Link(f"gcopy-{os.getpid()}")
    try:
        link.create()
        hosts = [(h, link.addresses[h], [f"--net={link.path(h)}"]) for h in ("A", "B")]
        with sites(tmp_path, hosts, daemon_args=["--insecure"], migctl_args=["--insecure"],
                   b_dstd_args=["--migration-timeout", str(DSTD_MIGRATION_TIMEOUT)]) as made:  # fmt: skip
            yield (*made, link)
    finally:
        link.destroy()


@pytest.mark.netns
def test_link_cut_during_the_disk_copy(
    linked: tuple[Site, Site, Path, Link], image: g.Image, domname: str, report: Report
) -> None:
    """B's end of the link goes down while the disk copies: the migration fails, and the
    source, while the link is still down, runs alone on its own disk with its guest
    counting (the mirror's connection hangs with the link: srcd shuts it down, else
    removing its node would block the source's QEMU until TCP gives up). Once the link is
    back, B ends up holding nothing."""
    a, b, images, link = linked
    with copying_guest(a, b, images, image, domname) as c:
        link.set_up(False)
        cut = time.monotonic()
        try:
            last = failed_quietly(c.migration, timeout=CUT_TO_FAILURE)
            report("cut_to_failure", time.monotonic() - cut)
            assert source_runs_alone(a, domname, c.u)
            counts_on_at_the_source(c, a, domname)
        finally:
            link.set_up(True)
    assert last == "error: operation failed: Lost connection to destination host" or (
        last.startswith("error: operation failed: migration of disk vda failed")
    ), last
    back = time.monotonic()
    wait_until(lambda: nothing_left(b, domname, c.u, c.disk), RECOVERED, "B to drop the job")
    report("link_back_to_nothing_on_b", time.monotonic() - back)
    settled(a.host, b.host)
    counts_on_at_the_source(c, a, domname)
    destroy_and_undefine(a.host, domname)


# ---- a virt-install-like guest ---------------------------------------------------------


def test_virt_install_server_migrates_with_copy_storage_all(
    lab: tuple[Site, Site, Path], domname: str, tmp_path: Path, report: Report
) -> None:
    """The q35 server of tests/integration/test_qemu_devices.py (a qcow2 disk with
    cache='none' io='native', PCIe root ports, no OS: its firmware only reads the disk),
    its disk on A only, moved with --copy-storage-all: B runs the same device layout, and
    its disk, created by its dstd, holds exactly what A's does."""
    a, b, images = lab
    u = str(uuidlib.uuid4())
    # the golden's disk is made in A's directory, and named by the common path
    xml = virt_install_xml("server-q35", domname, u, a.ns.private)
    xml = xml.replace(str(a.ns.private), str(images))
    disk = images / f"{domname}-0.img"
    assert f'file="{disk}"' in xml and a.own(disk).exists() and not b.own(disk).exists()
    written_on_top(
        a, disk, (0x3C, 0, MiB), (0xC3, 40 * MiB, 8 * MiB), (0x7E, 64 * MiB - 4096, 4096)
    )
    a.host.define(xml, f"{domname}.xml")
    a.host.migctl("start", domname)
    with qmp_for(a.host.state_dir, u) as q:
        source_pci = pci_layout(q)
    placed = pci_addresses(a.host, domname)
    mid = str(uuidlib.uuid4())
    t0 = time.monotonic()
    a.host.migctl(*MOVE, "--copy-storage-all", "--migration-id", mid, domname, b.host.dst,
                  timeout=180)  # fmt: skip
    report("migctl_migrate_server_q35_copy_all", time.monotonic() - t0)
    assert b.host.migctl("domstate", domname).stdout.strip() == "running"
    assert domname not in a.host.names()
    assert pci_addresses(b.host, domname) == placed
    with qmp_for(b.host.state_dir, u) as q:
        assert q.cmd("query-status")["status"] == "running"
        assert pci_layout(q) == source_pci
        assert q.cmd("query-block-jobs") == [] and q.cmd("query-block-exports") == []
    created = image_info(b, disk)
    assert (created["format"], created["virtual-size"]) == ("qcow2", 64 * MiB)
    b.host.migctl("destroy", domname)
    assert QEMU_IMG is not None
    same = subprocess.run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", str(a.own(disk)),
                           str(b.own(disk))], capture_output=True, text=True, check=False)  # fmt: skip
    assert same.returncode == 0, same.stdout + same.stderr
    b.host.migctl("undefine", domname)
    settled(a.host, b.host)


def pci_addresses(host: Host, name: str) -> set[tuple[str | None, ...]]:
    """The PCI addresses the live XML gives the devices (the layout decided at start)."""
    live = etree.fromstring(host.migctl("dumpxml", name).stdout.encode())
    return {(ad.get("bus"), ad.get("slot"), ad.get("function"))
            for ad in live.iterfind("devices/*/address[@type='pci']")}  # fmt: skip
