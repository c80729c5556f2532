"""Storage copy through the daemons (docs/ARCHITECTURE.md section 14): real QEMU guests (no
OS: a disk with a pattern is all there is to move) migrate live with --copy-storage-all or
--copy-storage-inc, and the destination's disk ends up the same as the source's.

Each host has a disk of its own at the same path: each runs in a mount namespace of its own
where a private directory is bind-mounted on the images directory (helpers/storagecopy.py),
and its daemons, emulators and migctl enter it. The test reads each host's file through that
private directory. Needs root (mount namespaces) and QEMU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.domains import define_and_start, destroy_and_undefine, disk_xml, qemu_domain_xml
from helpers.hosts import Host, settled, wait_until
from helpers.live import state
from helpers.qmp import qmp_for, runtime_record
from helpers.storagecopy import (
    Site,
    copy_under_way,
    copying,
    domjobinfo,
    dstd_args,
    failed_with,
    sites,
    srcd_args,
)

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        QEMU is None or QEMU_IMG is None or QEMU_IO is None, reason="QEMU not installed"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root"),
]

MIB = 1 << 20
LIVE = ("migrate", "--live", "--persistent")  # the source keeps its definition: domjobinfo
CANCELLED = "error: operation aborted: job 'migration out' canceled by client"


@dataclasses.dataclass
class Lab:
    a: Host
    b: Host
    images: Path  # the same path on both hosts, a different directory on each
    sites: dict[str, Site]

    def disks(self, host: Host) -> Path:
        """Where the test sees ``host``'s images."""
        return self.sites[host.name].ns.private

    def run_in(self, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
        """A command as ``host`` sees the files."""
        return self.sites[host.name].run(*args, check=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Hosts A and B, each seeing its own files under ``images`` (the same path on both),
    with storage copy allowed there; srcd probes its peers every 2 s (rpc-timeout 6 s)."""
    with sites(tmp_path_factory.mktemp("copy")) as (a, b, images):
        yield Lab(a.host, b.host, images, {"A": a, "B": b})


def make_image(
    lab: Lab,
    host: Host,
    path: Path,
    fmt: str,
    size: int,
    *patterns: tuple[int, int, int],
    backing: Path | None = None,
) -> None:
    """An image at ``path`` as ``host`` sees it, with ``patterns`` (byte, offset, length)
    written by qemu-io."""
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", "raw"]
    r = lab.run_in(host, *args, str(path), str(size))  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    writes = [a for byte, off, n in patterns for a in ("-c", f"write -P {byte:#x} {off} {n}")]
    if writes:
        r = lab.run_in(host, QEMU_IO, "-f", fmt, *writes, str(path))  # type: ignore[arg-type]
        assert r.returncode == 0, r.stderr


def same_content(a: Path, b: Path, fmt_a: str, fmt_b: str) -> bool:
    r = subprocess.run(
        [QEMU_IMG, "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],  # type: ignore[list-item]
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def start_guest(host: Host, name: str, disks: str) -> str:
    """A guest with no OS on ``disks``, started; returns its uuid."""
    return define_and_start(host, name, lambda u: qemu_domain_xml(name, u, disks, emulator=QEMU))


def jobinfo(host: Host, name: str) -> dict[str, str]:
    return domjobinfo(host, name, "--completed")


@pytest.mark.parametrize("mode", [["--p2p"], []], ids=["p2p", "client-driven"])
def test_copy_storage_all_moves_the_disk(
    lab: Lab, mode: list[str], request: pytest.FixtureRequest
) -> None:
    a, b = lab.a, lab.b
    name = f"copyall-{request.node.callspec.id}"
    image = lab.images / f"{name}.img"
    make_image(lab, a, image, "raw", 32 * MIB, (0xAB, 0, 4 * MIB), (0x5C, 20 * MIB, MIB))
    u = start_guest(a, name, disk_xml(image))
    assert not (lab.disks(b) / image.name).exists()
    a.migctl(*LIVE, *mode, "--copy-storage-all", name, b.dst, timeout=180)
    assert state(b, name) == "running" and state(a, name) == "shut off"
    with qmp_for(b.state_dir, u) as q:  # the destination's guest runs on its own copy
        blocks = {n["node-name"]: n for n in q.cmd("query-named-block-nodes", flat=True)}
        assert blocks["libvirt-1-format"]["image"]["filename"] == str(image)
        assert q.cmd("query-block-jobs") == [] and q.cmd("query-block-exports") == []
    info = jobinfo(a, name)
    assert info["Job type"] == "Completed"
    assert info["File total"] == "32.000 MiB" and info["File remaining"] == "0.000 MiB"
    b.migctl("destroy", name)
    assert same_content(lab.disks(a) / image.name, lab.disks(b) / image.name, "raw", "raw")
    created = lab.disks(b) / image.name
    assert created.stat().st_uid == os.getuid()  # the emulators' user: the daemon's here
    b.migctl("undefine", name)
    a.migctl("undefine", name)
    settled(a, b)


def data_map(lab: Lab, host: Host, image: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data in the top layer of ``image`` itself, as ``host`` sees
    it (qemu-img map: depth 0)."""
    r = lab.run_in(host, QEMU_IMG, "map", "--output=json", "-f", "qcow2", str(image))  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    return [(e["start"], e["length"]) for e in json.loads(r.stdout) if e["depth"] == 0 and e["data"]]


def test_copy_storage_inc_copies_the_top_layer_onto_the_same_backing_file(lab: Lab) -> None:
    a, b, name = lab.a, lab.b, "copyinc"
    base, top = lab.images / "base.raw", lab.images / "top.qcow2"
    for host in (a, b):  # the backing file is on both hosts, as --copy-storage-inc requires
        make_image(lab, host, base, "raw", 32 * MIB, (0xAB, 0, 8 * MIB))
    make_image(lab, a, top, "qcow2", 32 * MIB, (0xEE, MIB, MIB), (0x5C, 20 * MIB, MIB),
               backing=base)  # fmt: skip
    # the XML names no backing chain: the source reads it from QEMU and sends it
    start_guest(a, name, disk_xml(top, fmt="qcow2"))
    a.migctl(*LIVE, "--p2p", "--copy-storage-inc", name, b.dst, timeout=180)
    assert state(b, name) == "running"
    b.migctl("destroy", name)
    info = json.loads(lab.run_in(b, QEMU_IMG, "info", "--output=json", str(top)).stdout)  # type: ignore[arg-type]
    assert (info["format"], info["backing-filename"], info["virtual-size"]) == (
        "qcow2", str(base), 32 * MIB
    )  # fmt: skip
    # only the top layer came over: the destination's overlay holds what the source's does
    assert data_map(lab, b, top) == data_map(lab, a, top) != []
    # and the guest sees the same disk (B's overlay, read over A's identical base)
    r = lab.run_in(a, QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", str(top),  # type: ignore[arg-type]
                   str(lab.disks(b) / top.name))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # the definition moved with the chain it runs on
    assert f'<source file="{base}"/>' in b.migctl("dumpxml", "--inactive", name).stdout
    b.migctl("undefine", name)
    a.migctl("undefine", name)
    settled(a, b)


def test_migrate_disks_copies_the_named_disk_and_shares_the_other(lab: Lab, tmp_path: Path) -> None:
    a, b, name = lab.a, lab.b, "twodisks"
    copied = lab.images / f"{name}-vda.img"
    shared = tmp_path / f"{name}-vdb.img"  # outside the images: one file both hosts see
    make_image(lab, a, copied, "raw", 16 * MIB, (0x11, 0, 2 * MIB))
    make_image(lab, a, shared, "raw", 8 * MIB, (0x22, 0, MIB))
    before = shared.read_bytes()
    disks = disk_xml(copied) + disk_xml(shared, "vdb", cache="none")
    start_guest(a, name, disks)
    a.migctl("migrate", "--live", "--persistent", "--undefinesource", "--p2p", "--copy-storage-all",
             "--migrate-disks", "vda", name, b.dst, timeout=180)  # fmt: skip
    assert state(b, name) == "running" and state(a, name) == "absent"
    info = jobinfo(b, name)  # the destination's history: an incoming migration
    assert info["Operation"] == "Incoming migration"
    b.migctl("destroy", name)
    assert same_content(lab.disks(a) / copied.name, lab.disks(b) / copied.name, "raw", "raw")
    assert shared.read_bytes() == before  # not copied: the same file, untouched
    assert not (lab.disks(b) / shared.name).exists()
    # --undefinesource removed the source's definition, never its storage
    assert (lab.disks(a) / copied.name).exists()
    b.migctl("undefine", name)
    settled(a, b)


def test_a_disk_outside_storage_dirs_is_refused_and_nothing_is_created(
    lab: Lab, tmp_path: Path
) -> None:
    a, b, name = lab.a, lab.b, "outside"
    image = tmp_path / f"{name}.img"  # not under the destination's storage_dirs
    make_image(lab, a, image, "raw", 8 * MIB, (0x33, 0, MIB))
    before, listing = image.read_bytes(), sorted(lab.disks(b).iterdir())
    start_guest(a, name, disk_xml(image))
    r = a.migctl(*LIVE, "--p2p", "--copy-storage-all", name, b.dst, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        f"error: unsupported configuration: disk vda: '{image}' is outside the directories "
        f"this host allows storage copy to write (storage_dirs: {lab.images})"
    )
    assert state(a, name) == "running" and state(b, name) == "absent"
    assert image.read_bytes() == before and sorted(lab.disks(b).iterdir()) == listing
    destroy_and_undefine(a, name)
    settled(a, b)


@contextlib.contextmanager
def slow_copy(lab: Lab, name: str, *flags: str) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    """A guest whose 24 MiB of data copy at 1 MiB/s (--bandwidth applies to the mirrors,
    as in libvirt), caught while its disk is being copied: (uuid, the disk as the
    destination sees it, the running migctl)."""
    image = lab.images / f"{name}.img"
    make_image(lab, lab.a, image, "raw", 24 * MIB, (0x44, 0, 24 * MIB))
    u = start_guest(lab.a, name, disk_xml(image))
    with copy_under_way(lab.a, name, "migrate", "--live", "--p2p", "--copy-storage-all",
                        "--bandwidth", "1", *flags, name, lab.b.dst) as migration:  # fmt: skip
        yield u, lab.disks(lab.b) / image.name, migration


def aborted(lab: Lab, name: str, migration: subprocess.Popen[str]) -> str:
    """domjobabort while ``migration`` runs: it fails as cancelled. Returns its output."""
    lab.a.migctl("domjobabort", name)
    out, last = failed_with(migration, timeout=60)
    assert last == CANCELLED
    return out


def assert_source_runs_alone(lab: Lab, name: str, u: str) -> None:
    """The source runs on its own disk, its mirror and NBD node gone."""
    assert state(lab.a, name) == "running"
    with qmp_for(lab.a.state_dir, u) as q:
        assert q.cmd("query-status")["status"] == "running"
        assert q.cmd("query-block-jobs") == []
        nodes = {n["node-name"] for n in q.cmd("query-named-block-nodes", flat=True)}
    assert "migration-vda-storage" not in nodes and "libvirt-1-format" in nodes
    destroy_and_undefine(lab.a, name)


def test_destination_emulator_killed_during_the_copy(lab: Lab) -> None:
    name = "qemukilled"
    with slow_copy(lab, name) as (u, created, migration):
        assert created.exists()
        rec = runtime_record(lab.b.state_dir, u)
        assert rec is not None
        os.kill(int(rec["pid"]), signal.SIGKILL)
        _, last = failed_with(migration, timeout=120)
    assert last.startswith("error: operation failed: migration of disk vda failed"), last
    # Finish(cancelled) dropped the incoming job: the disk it created went with it
    wait_until(lambda: not created.exists(), 30, "the created disk's removal")
    assert state(lab.b, name) == "absent"
    settled(lab.a, lab.b)
    assert_source_runs_alone(lab, name, u)


def test_destination_daemon_killed_during_the_copy_is_recovered(lab: Lab) -> None:
    a, b, name = lab.a, lab.b, "dstdkilled"
    with slow_copy(lab, name) as (u, created, migration):
        assert b.dstd is not None
        b.dstd.kill()
        _, last = failed_with(migration, timeout=120)
    assert last == "error: operation failed: Lost connection to destination host"
    # nobody removed it: the dstd that created it is gone, and the source never deletes
    assert created.exists() and runtime_record(b.state_dir, u) is not None
    b.start_dstd(dstd_args(lab.images))  # recovery: the incoming emulator and its disk go
    wait_until(lambda: not created.exists(), 30, "recovery to remove the created disk")
    assert runtime_record(b.state_dir, u) is None or state(b, name) == "absent"
    settled(a, b)
    assert_source_runs_alone(lab, name, u)


def test_tunnelled_copy_storage_all_goes_through_the_daemons(lab: Lab) -> None:
    a, b, name = lab.a, lab.b, "tunnelled"
    image = lab.images / f"{name}.img"
    make_image(lab, a, image, "raw", 16 * MIB, (0x77, 0, 6 * MIB), (0x78, 15 * MIB, MIB))
    u = start_guest(a, name, disk_xml(image))
    a.migctl(*LIVE, "--p2p", "--tunnelled", "--copy-storage-all", name, b.dst, timeout=180)
    assert state(b, name) == "running"
    # the disk's bytes went through the daemons: a stream on the "nbd" channel, and the
    # emulators never had a TCP connection for it (the destination served a unix socket)
    assert any(e.get("event") == "nbd_tunnel_closed" and e.get("streams") == 1
               for e in a.srcd.events())  # type: ignore[union-attr]  # fmt: skip
    served = [e for e in b.dstd.events() if e.get("event") == "incoming_nbd_started"]  # type: ignore[union-attr]
    assert served and served[-1]["port"] is None and str(served[-1]["socket"]).endswith(f"{u}.nbd")
    info = jobinfo(a, name)
    assert info["File total"] == "16.000 MiB"
    b.migctl("destroy", name)
    assert same_content(lab.disks(a) / image.name, lab.disks(b) / image.name, "raw", "raw")
    b.migctl("undefine", name)
    a.migctl("undefine", name)
    settled(a, b)


def test_source_daemon_killed_during_the_copy_is_recovered(lab: Lab) -> None:
    a, b, name = lab.a, lab.b, "srcdkilled"
    with slow_copy(lab, name) as (u, created, migration):
        assert a.srcd is not None
        a.srcd.kill()
        migration.communicate(timeout=60)
    assert migration.returncode == 1  # migctl lost its daemon
    with qmp_for(a.state_dir, u) as q:  # the source QEMU copies on without its daemon
        assert [j["status"] for j in q.cmd("query-jobs")] in (["running"], ["ready"])
    # recovery cancels the copy, asks the destination (which drops the incoming job and
    # the disk it created) and the source runs on
    a.start_srcd(srcd_args())
    wait_until(lambda: not created.exists(), 60, "the destination to drop the created disk")
    settled(a, b)
    assert state(b, name) == "absent"
    assert_source_runs_alone(lab, name, u)


def test_abort_during_the_copy_leaves_the_source_as_it_was(lab: Lab) -> None:
    name = "aborted"
    with slow_copy(lab, name, "--verbose") as (u, created, migration):
        out = aborted(lab, name, migration)
    assert "Migration: [" in out  # --verbose showed the copy's progress
    wait_until(lambda: not created.exists(), 30, "the created disk's removal")
    info = jobinfo(lab.a, name)
    assert info["Job type"] == "Cancelled" and float(info["File processed"].split()[0]) > 0
    settled(lab.a, lab.b)
    assert_source_runs_alone(lab, name, u)


def test_destination_crash_right_after_creating_the_disk_is_recovered(lab: Lab) -> None:
    a, b, name = lab.a, lab.b, "crashcreated"
    image = lab.images / f"{name}.img"
    make_image(lab, a, image, "raw", 8 * MIB, (0x55, 0, MIB))
    u = start_guest(a, name, disk_xml(image))
    created = lab.disks(b) / image.name
    armed = {"VMMIGRATE_FAILPOINTS": "dstd.prepare.after_create=crash"}
    b.start_dstd(dstd_args(lab.images), env=armed)
    try:
        r = a.migctl(*LIVE, "--p2p", "--copy-storage-all", name, b.dst, check=False)
        assert r.returncode == 1
        assert b.dstd is not None and b.dstd.proc.wait(timeout=30) == 137  # it died there
        assert created.exists()  # made, and journalled before it was
        record = json.loads(next(iter(b.journal())).read_text())
        assert record["created_disks"] == [str(image)]
    finally:
        b.start_dstd(dstd_args(lab.images))  # recovery: the disk goes
    assert not created.exists()
    settled(a, b)
    assert state(b, name) == "absent"
    assert_source_runs_alone(lab, name, u)


def guest_write(host: Host, u: str, byte: int, offset: int, length: int) -> None:
    """Write to the guest's disk as its device would (HMP qemu-io on the virtio disk)."""
    with qmp_for(host.state_dir, u) as q:
        out = q.cmd("human-monitor-command",
                    **{"command-line": f'qemu-io -d virtio-disk0/virtio-backend "write -P {byte:#x} {offset} {length}"'})  # fmt: skip
    assert "rror" not in out, out  # (QEMU prints qemu-io's own report on its stdout)


def test_writes_during_the_copy_reach_the_destination(lab: Lab) -> None:
    a, b, name = lab.a, lab.b, "writes"
    image = lab.images / f"{name}.img"
    make_image(lab, a, image, "raw", 8 * MIB, (0x61, 0, 8 * MIB))
    u = start_guest(a, name, disk_xml(image))
    with copy_under_way(a, name, *LIVE, "--p2p", "--copy-storage-all", "--bandwidth", "2",
                        name, b.dst) as migration:  # fmt: skip
        guest_write(a, u, 0x99, 0, MIB)  # where the copy has been already
        guest_write(a, u, 0x9A, 7 * MIB, MIB)  # where it has not been yet
        _, err = migration.communicate(timeout=120)
    assert migration.returncode == 0, err
    b.migctl("destroy", name)
    got = lab.disks(b) / image.name
    with got.open("rb") as f:
        assert f.read(MIB) == b"\x99" * MIB and f.read(MIB) == b"\x61" * MIB
        f.seek(7 * MIB)
        assert f.read(MIB) == b"\x9a" * MIB
    assert same_content(lab.disks(a) / image.name, got, "raw", "raw")
    b.migctl("undefine", name)
    a.migctl("undefine", name)
    settled(a, b)


def test_timeout_counts_the_copy(lab: Lab) -> None:
    """--timeout runs from the start of the migration, disk copy included: virsh's action
    (suspend) pauses the guest while its disk is still being copied; an abort then leaves
    the source running as it was."""
    name = "timedout"
    with slow_copy(lab, name, "--timeout", "2") as (u, created, migration):
        wait_until(lambda: state(lab.a, name) == "paused", 30, "the timeout's suspend")
        assert migration.poll() is None and copying(lab.a, name)
        aborted(lab, name, migration)
    wait_until(lambda: not created.exists(), 30, "the created disk's removal")
    settled(lab.a, lab.b)
    assert_source_runs_alone(lab, name, u)
