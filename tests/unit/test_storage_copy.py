"""Storage copy's pure parts (docs/ARCHITECTURE.md section 14): the disks copied and how QEMU
names them, the <nbd> cookie sections both ways, the backing chains sent for
--copy-storage-inc."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from vmmigrate.common import qemuargv, tunnelwire
from vmmigrate.common.cookie import (
    ACCEPT_PERFORM,
    ACCEPT_PREPARE,
    MigrationCookie,
    Nbd,
    NbdDisk,
    format_cookie,
    parse_cookie,
)
from vmmigrate.common.disks import domain_disks
from vmmigrate.common.domainxml import parse_domain
from vmmigrate.common.errors import (
    ConfigUnsupported,
    InvalidArgument,
    OperationFailed,
    OperationInvalid,
    libvirt_text,
)
from vmmigrate.common.failpoints import Failpoints
from vmmigrate.common.flags import MigrateFlag as F
from vmmigrate.common.hypervisor import EmulatorPolicy, EmulatorSettings, QMPHypervisor
from vmmigrate.common.journal import JobRecord, Role, record_from_bytes, record_to_bytes
from vmmigrate.common.rpc import Deadline
from vmmigrate.common.store import HostStore
from vmmigrate.dstd.incoming import IncomingJob
from vmmigrate.dstd.storage import (
    IncomingDisk,
    copied_capacities,
    create_disks,
    give_to_emulator,
    plan_disks,
    qemu_img_create_args,
    remove_disks,
    reply_nbd,
    storage_dir_of,
)
from vmmigrate.dstd.tunnel import tunnel_target
from vmmigrate.migctl.main import print_jobinfo
from vmmigrate.migctl.progress import Progress
from vmmigrate.srcd.mirror import MirrorState, assess, sync_mode, totals
from vmmigrate.srcd.perform import Action, decide
from vmmigrate.srcd.server import job_info
from vmmigrate.srcd.storage import (
    CopiedDisk,
    backing_chain,
    begin_nbd,
    copies_of,
    with_backing_stores,
)

U = "6f1c1a8e-3b0e-4d55-9a57-0f3c2b1d9e01"
HOST_A = "11111111-1111-4111-8111-111111111111"
HOST_B = "22222222-2222-4222-8222-222222222222"


def disk(target: str, path: str = "", fmt: str = "raw", bus: str = "virtio", extra: str = "") -> str:
    source = f"<source file='{path}'/>" if path else ""
    device = "disk" if path or bus == "virtio" else "cdrom"
    return (
        f"<disk type='file' device='{device}'><driver name='qemu' type='{fmt}'/>{source}"
        f"<target dev='{target}' bus='{bus}'/>{extra}</disk>"
    )


def domain(*disks: str):  # type: ignore[no-untyped-def]
    return parse_domain(
        f"<domain type='kvm'><name>d</name><uuid>{U}</uuid><memory>65536</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<devices>{''.join(disks)}</devices></domain>"
    )


def node(name: str, size: int, backing: dict | None = None) -> dict:  # type: ignore[type-arg]
    image: dict = {"virtual-size": size, "filename": f"/img/{name}", "format": "qcow2"}  # type: ignore[type-arg]
    if backing is not None:
        image["backing-image"] = backing
    return {"node-name": name, "image": image}


def test_disk_nodes_follow_the_command_line() -> None:
    # a cdrom without media takes no node: the numbering is over disks with a source
    d = domain(
        disk("vda", "/img/a.img"),
        disk("hdc", bus="ide"),
        disk("vdb", "/img/b.qcow2", "qcow2"),
        disk("sda", "/img/c.img", bus="sata"),
        "<controller type='sata' index='0'/>",
    )
    nodes = qemuargv.disk_nodes(d)
    assert set(nodes) == {"vda", "vdb", "sda"}
    assert nodes["vda"] == qemuargv.DiskNodes(
        "vda", "virtio-disk0", "libvirt-1-format", "libvirt-1-storage"
    )
    assert nodes["vdb"].alias == "virtio-disk1" and nodes["vdb"].format_node == "libvirt-2-format"
    assert nodes["vdb"].export == "drive-virtio-disk1"  # libvirt's export name
    assert nodes["sda"] == qemuargv.DiskNodes(
        "sda", "sata0-0-0", "libvirt-3-format", "libvirt-3-storage"
    )
    # the same names as the argv QEMU runs with
    argv = " ".join(qemuargv.build_argv(d, qemuargv.HostFacts()))
    for n in nodes.values():
        assert f'"node-name":"{n.format_node}"' in argv and f"id={n.alias}" in argv
        assert f"drive={n.format_node}" in argv


def test_copies_take_size_and_chain_from_the_emulator() -> None:
    d = domain(
        disk("vda", "/img/a.img"),
        disk("vdb", "/img/b.qcow2", "qcow2", extra="<readonly/>"),
        disk("vdc", "/img/c.qcow2", "qcow2"),
    )
    base = {"filename": "/img/base.raw", "format": "raw"}
    mid = {"filename": "/img/mid.qcow2", "format": "qcow2", "backing-image": base}
    nodes = [
        node("libvirt-1-storage", 99),  # the protocol node: not the disk's size
        node("libvirt-1-format", 64 << 20),
        node("libvirt-2-format", 1 << 20),
        node("libvirt-3-format", 32 << 20, mid),
    ]
    copies = copies_of(d, (), nodes)
    assert copies == (
        CopiedDisk("vda", 64 << 20, "libvirt-1-format", "drive-virtio-disk0"),
        CopiedDisk(
            "vdc",
            32 << 20,
            "libvirt-3-format",
            "drive-virtio-disk2",
            (("/img/mid.qcow2", "qcow2"), ("/img/base.raw", "raw")),
        ),
    )
    # --migrate-disks picks them, the readonly one included
    assert [c.target for c in copies_of(d, ("vdb",), nodes)] == ["vdb"]
    with pytest.raises(OperationFailed, match="unable to find the size of disk 'vda' to copy"):
        copies_of(d, (), nodes[2:])
    assert backing_chain({"virtual-size": 1}) == ()
    # a flat answer (no nested images) still names the first layer
    flat = {"virtual-size": 1, "full-backing-filename": "/img/b.raw", "backing-filename-format": "raw"}
    assert backing_chain(flat) == (("/img/b.raw", "raw"),)


def test_begin_cookie_nbd_both_ways() -> None:
    copies = (CopiedDisk("vda", 16 << 20, "libvirt-1-format", "drive-virtio-disk0"),)
    assert begin_nbd(F.LIVE, copies) is None  # no storage copy: no <nbd>
    assert begin_nbd(F.LIVE | F.NON_SHARED_DISK, ()) == Nbd()  # asked, nothing to copy
    nbd = begin_nbd(F.LIVE | F.NON_SHARED_INC, copies)
    begin = MigrationCookie("d", U, "A", HOST_A, nbd=nbd)
    text = format_cookie(begin).decode()
    assert "  <nbd>\n    <disk target='vda' capacity='16777216'/>\n  </nbd>\n" in text
    got = parse_cookie(text.encode(), accept=ACCEPT_PREPARE, local_hostuuid=HOST_B)
    assert got.nbd == Nbd(disks=(NbdDisk("vda", 16 << 20),))
    # the destination's answer: its port, and the disks it exports (as libvirt echoes them)
    reply = MigrationCookie("d", U, "B", HOST_B, nbd=Nbd(port=49153, disks=got.nbd.disks))
    back = parse_cookie(format_cookie(reply), accept=ACCEPT_PERFORM, local_hostuuid=HOST_A)
    assert back.nbd == Nbd(port=49153, disks=(NbdDisk("vda", 16 << 20),))


def test_inc_sends_the_backing_chain_the_xml_lacks() -> None:
    stated = (
        "<backingStore type='file'><format type='raw'/><source file='/img/own.raw'/>"
        "<backingStore/></backingStore>"
    )
    d = domain(disk("vda", "/img/a.qcow2", "qcow2"), disk("vdb", "/img/b.qcow2", "qcow2", extra=stated))
    chain = (("/img/mid.qcow2", "qcow2"), ("/img/base.raw", "raw"))
    copies = (
        CopiedDisk("vda", 1, "libvirt-1-format", "drive-virtio-disk0", chain),
        CopiedDisk("vdb", 1, "libvirt-2-format", "drive-virtio-disk1", (("/img/x", "raw"),)),
    )
    assert with_backing_stores(d, F.LIVE | F.NON_SHARED_DISK, copies) is d  # copy-all: as is
    sent = with_backing_stores(d, F.LIVE | F.NON_SHARED_INC, copies)
    vda, vdb = domain_disks(sent)
    assert (vda.backing, vda.backing_format) == ("/img/mid.qcow2", "qcow2")
    assert (vdb.backing, vdb.backing_format) == ("/img/own.raw", "raw")  # stated: kept
    assert sent.uuid == d.uuid and sent.name == d.name
    assert sent.xml.count("<backingStore") == 3 + 2  # two layers and the end, and vdb's
    qemuargv.check_supported(sent)  # QEMU's command line still takes it


# ------------------------------------------------------------------ the destination's plan


def test_copied_capacities_come_from_the_cookie() -> None:
    nbd = Nbd(disks=(NbdDisk("vda", 1 << 20), NbdDisk("vdb", 2 << 20)))
    assert copied_capacities(nbd, F.LIVE | F.NON_SHARED_DISK) == {"vda": 1 << 20, "vdb": 2 << 20}
    assert copied_capacities(nbd, F.LIVE) == {}  # no storage copy asked: nothing copied
    assert copied_capacities(None, F.LIVE | F.NON_SHARED_INC) == {}


def test_storage_dirs_resolve_symlinks(tmp_path: Path) -> None:
    allowed, other = tmp_path / "images", tmp_path / "etc"
    allowed.mkdir()
    other.mkdir()
    (allowed / "escape").symlink_to(other / "shadow")
    dirs = (str(allowed),)
    assert storage_dir_of(str(allowed / "vm.img"), dirs) == str(allowed)
    assert storage_dir_of(str(allowed / "sub" / "vm.img"), dirs) == str(allowed)
    assert storage_dir_of(str(allowed / "escape"), dirs) is None  # a link out of it
    assert storage_dir_of(str(allowed / ".." / "etc" / "x"), dirs) is None
    assert storage_dir_of(str(tmp_path / "images-2" / "x"), dirs) is None  # a prefix only
    assert storage_dir_of(str(allowed), dirs) is None  # the directory itself is no disk
    assert storage_dir_of(str(allowed / "vm.img"), ()) is None


def plan(d, nbd, flags, dirs, existing=()):  # type: ignore[no-untyped-def]
    return plan_disks(d, nbd, flags, dirs, exists=lambda p: p in existing)


def test_plan_creates_what_is_missing_and_uses_what_exists() -> None:
    d = domain(
        disk("vda", "/img/a.img"),
        disk("vdb", "/img/b.qcow2", "qcow2"),
        disk("vdc", "/shared/c.img"),
    )
    nbd = Nbd(disks=(NbdDisk("vda", 64 << 20), NbdDisk("vdb", 32 << 20)))
    got = plan(d, nbd, F.LIVE | F.NON_SHARED_DISK, ("/img",), existing={"/img/b.qcow2"})
    assert got == (
        IncomingDisk("vda", "/img/a.img", "raw", 64 << 20, "drive-virtio-disk0",
                     "libvirt-1-format", True),
        IncomingDisk("vdb", "/img/b.qcow2", "", 32 << 20, "drive-virtio-disk1",
                     "libvirt-2-format", False),
    )  # fmt: skip
    # vdc is not copied (not in the cookie): shared storage, storage_dirs do not apply
    assert reply_nbd(got, 49153) == Nbd(port=49153, disks=nbd.disks)
    assert reply_nbd(got, 0) == Nbd(disks=nbd.disks)  # tunnelled: no port
    assert reply_nbd((), 49153) is None
    assert plan(d, None, F.LIVE | F.NON_SHARED_DISK, ("/img",)) == ()


def test_plan_refusals_name_the_disk_and_the_key() -> None:
    d = domain(disk("vda", "/var/lib/other/a.img"))
    nbd = Nbd(disks=(NbdDisk("vda", 1 << 20),))
    with pytest.raises(ConfigUnsupported) as info:
        plan(d, nbd, F.LIVE | F.NON_SHARED_DISK, ("/img", "/srv/vm"))
    assert libvirt_text(info.value) == (
        "unsupported configuration: disk vda: '/var/lib/other/a.img' is outside the "
        "directories this host allows storage copy to write (storage_dirs: /img, /srv/vm)"
    )
    with pytest.raises(ConfigUnsupported, match=r"\(storage_dirs: none configured\)$"):
        plan(d, nbd, F.LIVE | F.NON_SHARED_DISK, ())
    with pytest.raises(OperationFailed, match=r"^unable to find disk by target: vdz$"):
        plan(d, Nbd(disks=(NbdDisk("vdz", 1),)), F.LIVE | F.NON_SHARED_DISK, ("/var",))
    block = domain(
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        "<source dev='/img/dev0'/><target dev='vda' bus='virtio'/></disk>"
    )
    with pytest.raises(OperationFailed, match=r"^cannot precreate storage for disk type 'block'$"):
        plan(block, nbd, F.LIVE | F.NON_SHARED_DISK, ("/img",))
    # an existing block device is used as it is
    assert plan(block, nbd, F.LIVE | F.NON_SHARED_DISK, ("/img",), {"/img/dev0"})[0].create is False


def test_inc_creates_an_overlay_of_a_backing_file_present_here() -> None:
    chain = (
        "<backingStore type='file'><format type='raw'/><source file='/img/base.raw'/>"
        "<backingStore/></backingStore>"
    )
    d = domain(disk("vda", "/img/top.qcow2", "qcow2", extra=chain))
    nbd = Nbd(disks=(NbdDisk("vda", 32 << 20),))
    inc, full = F.LIVE | F.NON_SHARED_INC, F.LIVE | F.NON_SHARED_DISK
    (got,) = plan(d, nbd, inc, ("/img",), existing={"/img/base.raw"})
    assert (got.create, got.format, got.backing, got.backing_format) == (
        True, "qcow2", "/img/base.raw", "raw"
    )  # fmt: skip
    assert qemu_img_create_args(got) == [
        "create", "-q", "-f", "qcow2", "-b", "/img/base.raw", "-F", "raw", "/img/top.qcow2",
        str(32 << 20),
    ]  # fmt: skip
    # copy-all: a whole image, no backing
    (whole,) = plan(d, nbd, full, ("/img",), existing={"/img/base.raw"})
    assert whole.backing == "" and qemu_img_create_args(whole)[-2:] == ["/img/top.qcow2", str(32 << 20)]
    with pytest.raises(OperationFailed, match=r"its backing file '/img/base.raw' does not exist"):
        plan(d, nbd, inc, ("/img",))
    elsewhere = domain(disk("vda", "/img/top.qcow2", "qcow2", extra=chain.replace("/img/", "/ro/")))
    with pytest.raises(ConfigUnsupported, match=r"^backing file '/ro/base.raw' is outside"):
        plan(elsewhere, nbd, inc, ("/img",), existing={"/ro/base.raw"})


def test_journal_keeps_created_disks_and_reads_older_records() -> None:
    rec = JobRecord("m1", Role.DESTINATION, "d", U, "prepare", 0x41, "peer",
                    created_disks=("/img/a.img", "/img/b.qcow2"))  # fmt: skip
    data = record_to_bytes(rec)
    assert json.loads(data)["created_disks"] == ["/img/a.img", "/img/b.qcow2"]
    assert record_from_bytes(data) == rec
    older = json.loads(data)
    del older["created_disks"]  # a record written before the field existed
    assert record_from_bytes(json.dumps(older).encode()).created_disks == ()
    older["created_disks"] = "/img/a.img"
    with pytest.raises(ValueError, match="not a list of strings"):
        record_from_bytes(json.dumps(older).encode())


QEMU_IMG = shutil.which("qemu-img")


def _incoming(tmp_path: Path, failpoints: str = "") -> tuple[SimpleNamespace, IncomingJob]:
    store = HostStore(tmp_path / "state")
    hv = QMPHypervisor(tmp_path / "state" / "run", EmulatorSettings())
    # the parts of a DestinationContext create_disks uses: the real store, failpoints
    ctx = SimpleNamespace(store=store, hypervisor=hv, failpoints=Failpoints.parse(failpoints))
    d = domain(disk("vda", str(tmp_path / "a.img")), disk("vdb", str(tmp_path / "b.qcow2"), "qcow2"))
    rec = JobRecord("m1", Role.DESTINATION, "d", U, "prepare", 0x41, "peer", xml=d.xml)
    store.reserve_incoming(rec)
    job = IncomingJob("m1", d, "d", F.LIVE | F.NON_SHARED_DISK, rec, Deadline(60), False)
    return ctx, job


def test_created_disks_are_journalled_before_the_first_exists(tmp_path: Path) -> None:
    ctx, job = _incoming(tmp_path, "dstd.prepare.before_create=error")
    nbd = Nbd(disks=(NbdDisk("vda", 1 << 20), NbdDisk("vdb", 2 << 20)))
    disks = plan_disks(job.target, nbd, job.flags, (str(tmp_path),))
    with pytest.raises(OperationFailed, match="before_create injected"):
        asyncio.run(create_disks(ctx, job, disks))  # type: ignore[arg-type]
    paths = (str(tmp_path / "a.img"), str(tmp_path / "b.qcow2"))
    # a dstd that died here leaves a record naming both, and no file yet
    recorded = ctx.store.journal_get("m1")
    assert recorded is not None and recorded.created_disks == paths == job.created_disks
    assert not any(Path(p).exists() for p in paths)


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_only_missing_disks_are_created_and_only_those_removed(tmp_path: Path) -> None:
    ctx, job = _incoming(tmp_path)
    existing = tmp_path / "b.qcow2"
    existing.write_bytes(b"kept as it is")
    nbd = Nbd(disks=(NbdDisk("vda", 1 << 20), NbdDisk("vdb", 2 << 20)))
    disks = plan_disks(job.target, nbd, job.flags, (str(tmp_path),))
    asyncio.run(create_disks(ctx, job, disks))  # type: ignore[arg-type]
    created = tmp_path / "a.img"
    assert job.created_disks == (str(created),)
    assert ctx.store.journal_get("m1").created_disks == (str(created),)
    info = json.loads(subprocess.run([QEMU_IMG, "info", "--output=json", str(created)],  # type: ignore[list-item]
                                     capture_output=True, check=True, text=True).stdout)
    assert (info["format"], info["virtual-size"]) == ("raw", 1 << 20)
    assert existing.read_bytes() == b"kept as it is"
    remove_disks(job.created_disks)
    assert not created.exists() and existing.exists()
    remove_disks(job.created_disks)  # again: nothing left to remove, no error


# ------------------------------------------------------------------ the source's mirrors

VDA = CopiedDisk("vda", 32 << 20, "libvirt-1-format", "drive-virtio-disk0")
VDB = CopiedDisk("vdb", 16 << 20, "libvirt-2-format", "drive-virtio-disk1")


def qjob(job_id: str, status: str, done: int = 0, total: int = 0, error: str = "") -> dict:  # type: ignore[type-arg]
    j = {"id": job_id, "type": "mirror", "status": status,
         "current-progress": done, "total-progress": total}  # fmt: skip
    if error:
        j["error"] = error
    return j


MIRROR_CASES = [
    # (vda's job, vdb's job) -> state, failed disk, error
    ((qjob(VDA.export, "running"), qjob(VDB.export, "ready")), MirrorState.COPYING, "", ""),
    ((qjob(VDA.export, "ready"), qjob(VDB.export, "ready")), MirrorState.READY, "", ""),
    ((qjob(VDA.export, "standby"), qjob(VDB.export, "ready")), MirrorState.READY, "", ""),
    ((qjob(VDA.export, "created"), qjob(VDB.export, "paused")), MirrorState.COPYING, "", ""),
    ((qjob(VDA.export, "ready"),), MirrorState.FAILED, "vdb", "its block job is gone"),
    ((qjob(VDA.export, "concluded", error="Input/output error"), qjob(VDB.export, "ready")),
     MirrorState.FAILED, "vda", "Input/output error"),
    ((qjob(VDA.export, "ready"), qjob(VDB.export, "aborting")), MirrorState.FAILED, "vdb", ""),
    ((qjob(VDA.export, "ready"), qjob(VDB.export, "concluded")), MirrorState.FAILED, "vdb", ""),
    # another job on the domain is none of the migration's business
    ((qjob("other", "concluded", error="x"), qjob(VDA.export, "ready"), qjob(VDB.export, "ready")),
     MirrorState.READY, "", ""),
]  # fmt: skip


@pytest.mark.parametrize(("jobs", "state", "target", "error"), MIRROR_CASES)
def test_mirror_state(jobs: tuple[dict, ...], state: MirrorState, target: str, error: str) -> None:  # type: ignore[type-arg]
    found = assess((VDA, VDB), jobs)
    assert (found.state, found.target, found.error) == (state, target, error)


def test_mirror_failures_in_libvirts_words() -> None:
    failed = assess((VDA,), (qjob(VDA.export, "concluded", error="Connection reset by peer"),))
    assert libvirt_text(failed.failure()) == (
        "operation failed: migration of disk vda failed: Connection reset by peer"
    )
    bare = assess((VDA,), (qjob(VDA.export, "aborting"),)).failure()
    assert libvirt_text(bare) == "operation failed: migration of disk vda failed"


def test_mirror_totals_and_sync_modes() -> None:
    jobs = (qjob(VDA.export, "running", 8 << 20, 32 << 20), qjob(VDB.export, "ready", 16 << 20, 16 << 20),
            qjob("other", "running", 1, 99))  # fmt: skip
    assert totals((VDA, VDB), jobs) == {"total": 48 << 20, "transferred": 24 << 20, "remaining": 24 << 20}
    assert totals((VDA,), ()) == {"total": 0, "transferred": 0, "remaining": 0}
    assert sync_mode(F.LIVE | F.NON_SHARED_DISK) == "full"
    assert sync_mode(F.LIVE | F.NON_SHARED_INC) == "top"


@pytest.mark.parametrize(
    ("abort", "peer_lost", "storage_failed", "deadline", "expected"),
    [
        (False, False, True, False, Action.CANCEL_STORAGE),
        (True, False, True, False, Action.CANCEL_ABORT),  # the client's abort says why
        (False, True, True, False, Action.CANCEL_PEER_LOST),  # a lost peer breaks the copy
        (False, False, True, True, Action.CANCEL_STORAGE),  # before the deadline's reason
        (False, False, False, False, Action.WAIT),
    ],
)
def test_a_failed_copy_cancels_the_migration(
    abort: bool, peer_lost: bool, storage_failed: bool, deadline: bool, expected: Action
) -> None:
    assert decide(elapsed=1.0, timeout_s=0, timeout_suspend=False, suspended=False,
                  abort_requested=abort, cancelling=False, peer_lost=peer_lost,
                  deadline_passed=deadline, storage_failed=storage_failed) is expected  # fmt: skip


def test_domjobinfo_counts_disks_in_the_data_lines() -> None:
    stats = {"ram": {"total": 64 << 20, "transferred": 10 << 20, "remaining": 54 << 20},
             "mirror": {"total": 32 << 20, "transferred": 32 << 20, "remaining": 0}}  # fmt: skip
    info = job_info(stats, "m", 5, "Unbounded", "")
    assert (info.data_total, info.data_processed, info.data_remaining) == (96 << 20, 42 << 20, 54 << 20)
    assert (info.memory_total, info.disk_total, info.disk_processed) == (64 << 20, 32 << 20, 32 << 20)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_jobinfo(info)
    lines = out.getvalue().splitlines()
    assert "Data total:       96.000 MiB" in lines and "Memory total:     64.000 MiB" in lines
    assert lines[-4:-1] == [
        "File processed:   32.000 MiB",
        "File remaining:   0.000 MiB",
        "File total:       32.000 MiB",
    ]
    plain = io.StringIO()
    with contextlib.redirect_stdout(plain):
        print_jobinfo(job_info({"ram": stats["ram"]}, "m", 5, "Unbounded", ""))
    assert "File" not in plain.getvalue()  # no storage copy: no File lines
    # migrate --verbose: the percentage counts the disks too
    progress = Progress(io.StringIO())
    assert progress.percent(info) == 100 - (54 * 100) // 96


def test_tunnel_channels_lead_to_their_sockets(tmp_path: Path) -> None:
    ctx, job = _incoming(tmp_path)
    table = {"m1": job}
    ctx.incoming = SimpleNamespace(find=table.get)
    job.flags |= F.TUNNELLED | F.PEER2PEER
    job.path = "/run/x/u.incoming"
    with pytest.raises(OperationInvalid, match=r"^incoming migration 'm1' copies no storage$"):
        tunnel_target(ctx, "m1", tunnelwire.CHANNEL_NBD)  # type: ignore[arg-type]
    job.nbd_path = "/run/x/u.nbd"
    assert tunnel_target(ctx, "m1", "") == "/run/x/u.incoming"  # type: ignore[arg-type]  # the memory
    assert tunnel_target(ctx, "m1", "nbd") == "/run/x/u.nbd"  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"^unknown tunnel channel 'disk'$"):
        tunnel_target(ctx, "m1", "disk")  # type: ignore[arg-type]
    with pytest.raises(OperationInvalid, match=r"^no tunnelled incoming migration with id 'm2'$"):
        tunnel_target(ctx, "m2", "nbd")  # type: ignore[arg-type]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_created_disks_belong_to_the_emulator_user(tmp_path: Path) -> None:
    disk_file = tmp_path / "a.img"
    disk_file.write_bytes(b"")
    give_to_emulator(str(disk_file), EmulatorPolicy())  # the daemon's own: left as it is
    assert (disk_file.stat().st_uid, disk_file.stat().st_gid) == (os.getuid(), os.getgid())
    give_to_emulator(str(disk_file), EmulatorPolicy(uid=65534, gid=65533))
    assert (disk_file.stat().st_uid, disk_file.stat().st_gid) == (65534, 65533)
    give_to_emulator(str(disk_file), EmulatorPolicy(gid=65532))  # a group alone
    assert (disk_file.stat().st_uid, disk_file.stat().st_gid) == (65534, 65532)
