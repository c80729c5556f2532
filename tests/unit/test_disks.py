"""The disk model of a domain, libvirt's disk checks of a live migration, and simvm's
-drive arguments built from the XML."""

from __future__ import annotations

import pytest
from vmmigrate.common.disks import (
    UNSAFE_CACHE,
    check_live_disks,
    check_migrate_disks,
    check_migration_safe,
    check_storage_copy,
    copied_disks,
    domain_disks,
)
from vmmigrate.common.domainxml import parse_domain
from vmmigrate.common.errors import (
    ConfigUnsupported,
    InvalidArgument,
    MigrateUnsafe,
    OperationInvalid,
    libvirt_text,
)
from vmmigrate.common.flags import MigrateFlag as F
from vmmigrate.common.hypervisor import simvm_drives

U = "6f1c1a8e-3b0e-4d55-9a57-0f3c2b1d9e01"


def domain(*disks: str):  # type: ignore[no-untyped-def]
    body = "".join(disks)
    return parse_domain(
        f"<domain type='kvm'><name>d</name><uuid>{U}</uuid><memory>65536</memory>"
        f"<devices>{body}</devices></domain>"
    )


def file_disk(target: str = "vda", cache: str | None = None, extra: str = "") -> str:
    c = f" cache='{cache}'" if cache else ""
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'{c}/>"
        f"<source file='/img/{target}.img'/><target dev='{target}' bus='virtio'/>{extra}</disk>"
    )


CDROM_EMPTY = "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>"
NETWORK = (
    "<disk type='network' device='disk'><source protocol='nbd' name='x'/>"
    "<target dev='vdn'/></disk>"
)


def test_domain_disks_reads_what_the_checks_need() -> None:
    d = domain(file_disk("vda", "none", "<shareable/>"), CDROM_EMPTY, NETWORK)
    vda, hdc, vdn = domain_disks(d)
    assert (vda.type, vda.device, vda.source, vda.target, vda.bus) == (
        "file",
        "disk",
        "/img/vda.img",
        "vda",
        "virtio",
    )
    assert (vda.format, vda.cache, vda.shareable, vda.readonly) == ("raw", "none", True, False)
    assert hdc.empty and hdc.readonly and hdc.device == "cdrom"
    assert vdn.type == "network" and vdn.source == "x"


@pytest.mark.parametrize(
    "disk",
    [
        file_disk(cache="none"),
        file_disk(cache="directsync"),
        file_disk(extra="<readonly/>"),
        file_disk(extra="<shareable/>"),
        CDROM_EMPTY,
        NETWORK,
    ],
    ids=["none", "directsync", "readonly", "shareable", "cdrom-empty", "network"],
)
def test_safe_disks(disk: str) -> None:
    check_migration_safe(domain_disks(domain(disk)), F.LIVE)


@pytest.mark.parametrize("cache", [None, "writeback", "writethrough", "unsafe"])
def test_unsafe_cache_modes_and_what_overrides_them(cache: str | None) -> None:
    disks = domain_disks(domain(file_disk(cache="none"), file_disk("vdb", cache)))
    with pytest.raises(MigrateUnsafe) as info:
        check_migration_safe(disks, F.LIVE)
    assert libvirt_text(info.value) == f"Unsafe migration: {UNSAFE_CACHE}"
    check_migration_safe(disks, F.LIVE | F.UNSAFE)
    check_migration_safe(disks, F.OFFLINE | F.PERSIST_DEST)
    check_migration_safe(disks, F.LIVE | F.NON_SHARED_DISK)  # copied: safe
    check_migration_safe(disks, F.LIVE | F.NON_SHARED_INC, ["vdb"])
    with pytest.raises(MigrateUnsafe):  # vdb is not among the copied disks
        check_migration_safe(disks, F.LIVE | F.NON_SHARED_DISK, ["vda"])


def test_migrate_disks_rules() -> None:
    disks = domain_disks(domain(file_disk("vda"), file_disk("vdb")))
    check_migrate_disks(disks, F.LIVE, [])
    check_migrate_disks(disks, F.LIVE | F.NON_SHARED_DISK, ["vdb"])
    with pytest.raises(OperationInvalid, match="requires use of 'VIR_MIGRATE_NON_SHARED_DISK'"):
        check_migrate_disks(disks, F.LIVE, ["vda"])
    with pytest.raises(InvalidArgument, match=r"^disk target vdz not found$"):
        check_migrate_disks(disks, F.LIVE | F.NON_SHARED_INC, ["vda", "vdz"])


def test_storage_copy_refusals() -> None:
    check_storage_copy(F.LIVE, "simvm")
    check_storage_copy(F.OFFLINE | F.NON_SHARED_DISK, "simvm")  # the offline trio says it
    with pytest.raises(ConfigUnsupported) as info:
        check_storage_copy(F.LIVE | F.NON_SHARED_DISK, "simvm")
    assert libvirt_text(info.value) == "unsupported configuration: storage copy needs QEMU"
    # QEMU mirrors its disks over NBD: both kinds of copy pass
    check_storage_copy(F.LIVE | F.NON_SHARED_INC, "qemu")
    check_storage_copy(F.LIVE | F.NON_SHARED_DISK, "qemu")
    # the whole live sequence: the copied disk passes the safety check, then copy is refused
    with pytest.raises(ConfigUnsupported):
        check_live_disks(domain(file_disk()), F.LIVE | F.NON_SHARED_DISK, "simvm")
    check_live_disks(domain(file_disk()), F.LIVE | F.NON_SHARED_DISK, "qemu")


def test_copied_disks_are_libvirts() -> None:
    d = domain(
        file_disk("vda"),
        file_disk("vdb", extra="<readonly/>"),
        file_disk("vdc", extra="<shareable/>"),
        CDROM_EMPTY,
        file_disk("vdd", extra="<backingStore type='file'><format type='qcow2'/>"
                  "<source file='/img/base.qcow2'/><backingStore/></backingStore>"),
    )
    disks = domain_disks(d)
    # by default: every writable, unshared disk with media
    assert [x.target for x in copied_disks(disks)] == ["vda", "vdd"]
    # --migrate-disks names them (also a readonly or shared one); media are still needed
    assert [x.target for x in copied_disks(disks, ["vdb", "hdc", "vdc"])] == ["vdb", "vdc"]
    vdd = disks[-1]
    assert (vdd.backing, vdd.backing_format) == ("/img/base.qcow2", "qcow2")
    assert disks[0].backing == disks[0].backing_format == ""


def test_simvm_drives_from_the_xml() -> None:
    d = domain(
        file_disk("vda", "none"),
        file_disk("vdb", extra="<readonly/>").replace("/img/vdb.img", "/img/a,b.img"),
        CDROM_EMPTY,
        "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='sdb'/></disk>",
    )
    assert simvm_drives(d) == [
        "-drive",
        "file=/img/vda.img,format=raw,if=virtio,cache=none",
        "-drive",
        "file=/img/a,,b.img,format=raw,if=virtio,cache=writeback,readonly=on",
        "-drive",
        "file=/dev/sdz,format=raw,if=virtio,cache=writeback",
    ]
    assert simvm_drives(domain()) == []


@pytest.mark.parametrize(
    ("disk", "message"),
    [
        (NETWORK, "simvm cannot run disk 'vdn' of type 'network'"),
        (file_disk().replace("type='raw'", "type='qcow2'"), "of format 'qcow2' \\(raw only\\)"),
    ],
)
def test_simvm_refuses_disks_it_cannot_run(disk: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported, match=message):
        simvm_drives(domain(disk))
