"""Storage copy's pure parts (docs/ARCHITECTURE.md section 14): the disks copied and how QEMU
names them, the <nbd> cookie sections both ways, the backing chains sent for
--copy-storage-inc."""

from __future__ import annotations

import pytest
from vmmigrate.common import qemuargv
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
from vmmigrate.common.errors import OperationFailed
from vmmigrate.common.flags import MigrateFlag as F
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
