"""The destination checks that it can run a domain before it starts anything (hostcheck),
through the daemons with real QEMU: a live migration to a destination that lacks the disk
file, the bridge, the network or the machine type is refused in Prepare with libvirt's
text, printed by migctl; the domain runs on at the source, and the destination keeps no
reservation (journal) and started no emulator (run dir). ``start`` refuses the same way.

Both hosts run QEMU by default. B's QEMU is a wrapper around the installed one that lacks
the machine type pc-i440fx-7.1 (as an older build would), and B maps the network ``lab`` to
a bridge it does not have. What B lacks otherwise is given by --xml (virsh's way to change
the disk paths and interfaces of the destination's definition)."""

from __future__ import annotations

import os
import shutil
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.domains import define_and_start, destroy_and_undefine, disk_xml, qemu_domain_xml
from helpers.hosts import Host
from helpers.live import state
from helpers.qmp import qmp_for, runtime_record
from lxml import etree

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="QEMU not installed"),
]

LIVE = ("migrate", "--live", "--persistent", "--undefinesource")
MISSING_MACHINE = "pc-i440fx-7.1"
NO_BRIDGE = "checks-nobr0"  # no such interface on this machine


def older_qemu(where: Path) -> Path:
    """The installed QEMU, but without one machine type."""
    script = where / "qemu-system-x86_64"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -machine ] && [ "$2" = help ]; then\n'
        f"  {QEMU} -machine help | grep -v '^{MISSING_MACHINE} '\n"
        "  exit 0\n"
        "fi\n"
        f'exec {QEMU} "$@"\n'
    )
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def qemu_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    base = tmp_path_factory.mktemp("hostcheck")
    cfg_a = base / "a.toml"
    cfg_a.write_text('emulator = "qemu"\n')
    cfg_b = base / "b.toml"
    cfg_b.write_text(
        f'emulator = "qemu"\nqemu_binary = "{older_qemu(base)}"\n'
        f'networks = {{ lab = "{NO_BRIDGE}" }}\n'
    )
    a = Host("A", "127.0.0.2", base / "A")
    b = Host("B", "127.0.0.3", base / "B")
    try:
        a.start(srcd_args=["--config", str(cfg_a)], dstd_args=["--config", str(cfg_a)])
        b.start(srcd_args=["--config", str(cfg_b)], dstd_args=["--config", str(cfg_b)])
        yield a, b
    finally:
        a.stop()
        b.stop()


def domain_xml(name: str, u: str, image: Path, machine: str = "pc") -> str:
    disk = disk_xml(image, cache="none")  # cache='none': the live migrations' safety check
    return qemu_domain_xml(name, u, disk, domain_type="qemu", memory_mib=128, machine=machine)


def image(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(16 << 20)
    return path


def start_on(h: Host, name: str, tmp: Path, machine: str = "pc") -> str:
    disk = image(tmp / f"{name}.img")
    return define_and_start(h, name, lambda u: domain_xml(name, u, disk, machine))


def dest_xml(h: Host, name: str, tmp: Path, disk: Path | None = None, nic: str = "") -> Path:
    """The running definition (dumpxml, as virsh migrate --xml is made) with another disk
    path and/or one more interface."""
    root = etree.fromstring(h.migctl("dumpxml", name).stdout.encode())
    if disk is not None:
        root.find("devices/disk/source").set("file", str(disk))  # type: ignore[union-attr]
    if nic:
        root.find("devices").append(etree.fromstring(nic))  # type: ignore[union-attr]
    path = tmp / f"{name}-dest.xml"
    path.write_bytes(etree.tostring(root))
    return path


def assert_untouched(a: Host, b: Host, name: str, u: str) -> None:
    """The source runs on; the destination holds nothing for the domain."""
    assert state(a, name) == "running"
    with qmp_for(a.state_dir, u) as q:
        assert q.cmd("query-status")["status"] == "running"
    assert a.journal() == [] and b.journal() == []  # no job left, no reservation
    assert runtime_record(b.state_dir, u) is None
    assert list((b.state_dir / "run").glob(f"{u}*")) == []  # no emulator, socket or log
    assert name not in b.names()


def refused_text(r: object) -> str:
    assert getattr(r, "returncode", None) == 1, r
    return str(getattr(r, "stderr", "")).splitlines()[-1]


@pytest.mark.parametrize("mode", [["--p2p"], []], ids=["p2p", "managed"])
def test_disk_missing_on_the_destination(
    qemu_hosts: tuple[Host, Host], domname: str, tmp_path: Path, mode: list[str]
) -> None:
    a, b = qemu_hosts
    u = start_on(a, domname, tmp_path)
    missing = tmp_path / "elsewhere" / f"{domname}.img"
    xml = dest_xml(a, domname, tmp_path, disk=missing)
    r = a.migctl(*LIVE, *mode, "--xml", str(xml), domname, b.dst, check=False)
    assert refused_text(r) == (
        f"error: Cannot access storage file '{missing}': No such file or directory"
    ), r.stderr
    assert_untouched(a, b, domname, u)
    # the storage there, the same migration goes through
    missing.parent.mkdir()
    shutil.copyfile(tmp_path / f"{domname}.img", missing)
    a.migctl(*LIVE, *mode, "--xml", str(xml), domname, b.dst, timeout=180)
    assert state(b, domname) == "running" and state(a, domname) == "absent"
    destroy_and_undefine(b, domname)


@pytest.mark.parametrize(
    ("nic", "expected"),
    [
        (
            f"<interface type='bridge'><source bridge='{NO_BRIDGE}'/><model type='virtio'/>"
            "</interface>",
            f"error: Cannot get interface MTU on '{NO_BRIDGE}': No such device (bridge "
            f"'{NO_BRIDGE}' of <interface type='bridge'> does not exist on this host)",
        ),
        (
            "<interface type='network'><source network='lab'/><model type='virtio'/></interface>",
            f"error: Requested operation is not valid: network 'lab' is not active (its bridge "
            f"'{NO_BRIDGE}' does not exist on this host)",
        ),
        (
            "<interface type='network'><source network='default'/></interface>",
            "error: Network not found: no network with matching name 'default'",
        ),
    ],
    ids=["bridge", "network-inactive", "network-unknown"],
)
def test_bridge_missing_on_the_destination(
    qemu_hosts: tuple[Host, Host], domname: str, tmp_path: Path, nic: str, expected: str
) -> None:
    a, b = qemu_hosts
    u = start_on(a, domname, tmp_path)
    xml = dest_xml(a, domname, tmp_path, nic=nic)
    r = a.migctl(*LIVE, "--p2p", "--xml", str(xml), domname, b.dst, check=False)
    assert refused_text(r) == expected, r.stderr
    assert_untouched(a, b, domname, u)
    destroy_and_undefine(a, domname)


def test_machine_type_the_destination_qemu_lacks(
    qemu_hosts: tuple[Host, Host], domname: str, tmp_path: Path
) -> None:
    a, b = qemu_hosts
    u = start_on(a, domname, tmp_path, machine=MISSING_MACHINE)
    r = a.migctl(*LIVE, "--p2p", domname, b.dst, check=False)
    binary = b.workdir.parent / "qemu-system-x86_64"  # older_qemu's
    assert refused_text(r) == (
        f"error: unsupported configuration: Emulator '{binary}' does not support machine "
        f"type '{MISSING_MACHINE}'"
    ), r.stderr
    assert_untouched(a, b, domname, u)
    destroy_and_undefine(a, domname)


def test_start_is_refused_with_the_same_texts(
    qemu_hosts: tuple[Host, Host], domname: str, tmp_path: Path
) -> None:
    a, b = qemu_hosts
    u = str(uuidlib.uuid4())
    missing = tmp_path / "gone.img"
    a.define(domain_xml(domname, u, missing), f"{domname}.xml")
    r = a.migctl("start", domname, check=False)
    assert refused_text(r) == (
        f"error: Cannot access storage file '{missing}': No such file or directory"
    ), r.stderr
    # simvm opens its disks too
    simvm = domain_xml(domname, u, missing).replace(
        "<devices>", "<devices><emulator>simvm</emulator>"
    )
    a.define(simvm, f"{domname}.xml")
    r = a.migctl("start", domname, check=False)
    assert refused_text(r) == (
        f"error: Cannot access storage file '{missing}': No such file or directory"
    ), r.stderr
    assert state(a, domname) == "shut off"
    assert list((a.state_dir / "run").glob(f"{u}*")) == []
    a.migctl("undefine", domname)
    # B's QEMU lacks the machine type: start says so before QEMU runs
    b.define(domain_xml(domname, u, image(tmp_path / "b.img"), MISSING_MACHINE), f"{domname}.xml")
    r = b.migctl("start", domname, check=False)
    assert "does not support machine type 'pc-i440fx-7.1'" in refused_text(r), r.stderr
    assert list((b.state_dir / "run").glob(f"{u}*")) == []
    b.migctl("undefine", domname)


def test_each_daemon_asks_its_qemu_once_it_serves(qemu_hosts: tuple[Host, Host]) -> None:
    """Both daemons of A ask the installed QEMU what it offers in the background once they
    serve (one qemu_probed line each), so the first Prepare or start does not wait for it;
    B's binary is a wrapper the emulator allowlist does not name: it is not run at start."""
    a, b = qemu_hosts
    assert QEMU is not None
    want = os.path.normpath(QEMU)
    deadline = time.monotonic() + 30
    while True:
        probed = {
            kind: [e for e in d.events() if e.get("event") == "qemu_probed"]
            for kind, d in (("srcd", a.srcd), ("dstd", a.dstd))
            if d is not None
        }
        if all(len(v) == 1 for v in probed.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(probed) == {"srcd", "dstd"}
    for kind, lines in probed.items():
        assert [e["binary"] for e in lines] == [want], (kind, lines)
        assert 0 < float(lines[0]["ms"]) < 30_000  # type: ignore[arg-type]
    for d in (b.srcd, b.dstd):
        assert d is not None
        events = d.events()
        assert not [e for e in events if e.get("event") in ("qemu_probed", "qemu_probe_failed")]
