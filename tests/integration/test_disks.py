"""simvm domains with a disk: they write it while running, migrate live on shared storage
(the same file on both loopback hosts) and go on writing it on the destination; the disk
safety check and the storage-copy refusals leave both hosts unchanged."""

from __future__ import annotations

import time
import uuid as uuidlib
from pathlib import Path

import pytest
from helpers.hosts import Host, sample_domain_xml
from helpers.live import state
from helpers.qmp import qmp_for
from vmmigrate.simvm.disk import scan, slots_of

LIVE = ("migrate", "--live", "--persistent")
UNSAFE = (
    "Unsafe migration: Migration may lead to data corruption if disks use cache other than "
    "none or directsync"
)


def disk_xml(name: str, u: str, image: str, cache: str | None) -> str:
    driver = "<driver name='qemu' type='raw'" + (f" cache='{cache}'" if cache else "") + "/>"
    disk = (
        f"<disk type='file' device='disk'>{driver}<source file='{image}'/>"
        "<target dev='vda' bus='virtio'/></disk>\n    "
    )
    return sample_domain_xml(name, u, memory_mib=32).replace("<console", disk + "<console")


def start_with_disk(h: Host, name: str, tmp: Path, cache: str | None) -> tuple[str, str]:
    image = tmp / f"{name}.img"
    with image.open("wb") as f:
        f.truncate(256 << 10)
    u = str(uuidlib.uuid4())
    h.define(disk_xml(name, u, str(image), cache), f"{name}.xml")
    h.migctl("start", name)
    return u, str(image)


def next_seq(h: Host, u: str) -> int:
    with qmp_for(h.state_dir, u) as q:
        return int(q.cmd("x-simvm-query-disks")[0]["next-seq"])


def wait_seq(h: Host, u: str, above: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while (seq := next_seq(h, u)) <= above:
        assert time.monotonic() < deadline, f"the guest's disk stays at {seq}"
        time.sleep(0.05)
    return seq


def assert_continuous(image: str) -> list[int]:
    """One writer's sequence, never restarted: no torn record, no gap, no duplicate."""
    found = scan(image)
    assert found.torn == []
    seqs = found.seqs
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert len(seqs) == min(seqs[-1] + 1, slots_of(Path(image).stat().st_size))
    return seqs


@pytest.mark.parametrize("mode", [["--p2p"], []], ids=["p2p", "managed"])
def test_live_migration_with_shared_storage_goes_on_writing(
    hosts: tuple[Host, Host], domname: str, tmp_path: Path, mode: list[str]
) -> None:
    a, b = hosts
    u, image = start_with_disk(a, domname, tmp_path, "none")
    before = wait_seq(a, u, 30)
    a.migctl(*LIVE, *mode, "--undefinesource", domname, b.dst)
    assert state(b, domname) == "running" and state(a, domname) == "absent"
    wait_seq(b, u, before + 30)
    b.migctl("destroy", domname)
    seqs = assert_continuous(image)
    assert seqs[-1] >= before + 30
    b.migctl("undefine", domname)


@pytest.mark.parametrize(
    ("cache", "mode"),
    [(None, ["--p2p"]), ("writeback", []), ("unsafe", ["--p2p", "--tunnelled"])],
    ids=["default-p2p", "writeback-managed", "unsafe-tunnelled"],
)
def test_unsafe_cache_is_refused_without_unsafe(
    hosts: tuple[Host, Host], domname: str, tmp_path: Path, cache: str | None, mode: list[str]
) -> None:
    a, b = hosts
    u, image = start_with_disk(a, domname, tmp_path, cache)
    before_a, before_b = a.names(), b.names()
    r = a.migctl(*LIVE, *mode, domname, b.dst, check=False)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == f"error: {UNSAFE}", r.stderr
    assert a.names() == before_a and b.names() == before_b
    assert state(a, domname) == "running" and a.journal() == [] and b.journal() == []
    seq = wait_seq(a, u, next_seq(a, u))  # still writing on the source
    a.migctl(*LIVE, *mode, "--unsafe", "--undefinesource", domname, b.dst)
    wait_seq(b, u, seq + 10)
    b.migctl("destroy", domname)
    assert_continuous(image)
    b.migctl("undefine", domname)


def test_the_destination_checks_the_xml_it_will_run(
    hosts: tuple[Host, Host], domname: str, tmp_path: Path
) -> None:
    a, b = hosts
    u, image = start_with_disk(a, domname, tmp_path, "directsync")
    unsafe = tmp_path / "dest.xml"
    unsafe.write_text(disk_xml(domname, u, image, "writeback"))
    before_b = b.names()
    r = a.migctl(*LIVE, "--xml", str(unsafe), domname, b.dst, check=False)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == f"error: {UNSAFE}", r.stderr
    assert b.names() == before_b and state(a, domname) == "running"
    a.migctl("destroy", domname)
    a.migctl("undefine", domname)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--p2p", "--copy-storage-all"], "unsupported configuration: storage copy needs QEMU"),
        (["--copy-storage-inc"], "unsupported configuration: storage copy needs QEMU"),
        (
            ["--p2p", "--copy-storage-all", "--migrate-disks", "vda"],
            "unsupported configuration: storage copy needs QEMU",
        ),
        (
            ["--p2p", "--unsafe", "--migrate-disks", "vda"],
            "Requested operation is not valid: use of 'VIR_MIGRATE_PARAM_MIGRATE_DISKS' "
            "requires use of 'VIR_MIGRATE_NON_SHARED_DISK' or 'VIR_MIGRATE_NON_SHARED_INC' flag",
        ),
        (
            ["--copy-storage-all", "--migrate-disks", "vda,vdz"],
            "invalid argument: disk target vdz not found",
        ),
    ],
    ids=["all-p2p", "inc-managed", "migrate-disks", "disks-without-copy", "unknown-disk"],
)
def test_storage_copy_of_a_simvm_domain_is_refused_before_anything_starts(
    hosts: tuple[Host, Host], domname: str, tmp_path: Path, args: list[str], message: str
) -> None:
    a, b = hosts
    _, image = start_with_disk(a, domname, tmp_path, None)  # copied disks need no safe cache
    before_a, before_b = a.names(), b.names()
    r = a.migctl(*LIVE, *args, domname, b.dst, check=False)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == f"error: {message}", r.stderr
    assert a.names() == before_a and b.names() == before_b
    assert state(a, domname) == "running" and a.journal() == [] and b.journal() == []
    a.migctl("destroy", domname)
    a.migctl("undefine", domname)
    assert_continuous(image)
