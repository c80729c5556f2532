"""Storage copy through the daemons (docs/ARCHITECTURE.md section 14): real QEMU guests (no
OS: a disk with a pattern is all there is to move) migrate live with --copy-storage-all or
--copy-storage-inc, and the destination's disk ends up the same as the source's.

Each host has a disk of its own at the same path: each runs in a mount namespace of its own
(a holder process made with ``unshare -m --propagation private``) where a private directory
is bind-mounted on the images directory, and its daemons, emulators and migctl enter it
(``nsenter --mount``). The test reads each host's file through that private directory.
Needs root (mount namespaces) and QEMU.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.hosts import Host, settled, wait_until
from helpers.qmp import qmp_for

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


class Namespace:
    """A private mount namespace in which ``images`` shows ``private`` (held by a sleeping
    process, stopped by pid)."""

    def __init__(self, images: Path, private: Path) -> None:
        private.mkdir(parents=True, exist_ok=True)
        self.private = private
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
        )
        self.prefix = ["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt"]
        wait_until(self._entered, 10, "the mount namespace")
        subprocess.run([*self.prefix, "mount", "--bind", str(private), str(images)], check=True)

    def _entered(self) -> bool:
        try:
            return os.readlink(f"/proc/{self.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host, Path]]:
    """Hosts A and B, each seeing its own files under ``images`` (the same path on both),
    with storage copy allowed there."""
    base = tmp_path_factory.mktemp("copy")
    images = base / "images"
    images.mkdir()
    spaces, hosts = [], []
    try:
        for name, ip in (("A", "127.0.0.2"), ("B", "127.0.0.3")):
            ns = Namespace(images, base / f"{name}-disks")
            spaces.append(ns)
            host = Host(name, ip, base / name, prefix=ns.prefix)
            hosts.append(host)
            host.start(dstd_args=["--storage-dir", str(images)])
        yield hosts[0], hosts[1], images
    finally:
        for host in hosts:
            host.stop()
        for ns in spaces:
            ns.stop()


def disks_of(host: Host) -> Path:
    """Where the test sees ``host``'s images."""
    return host.workdir.parent / f"{host.name}-disks"


def guest_xml(name: str, u: str, disks: str) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>{u}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{QEMU}</emulator>
    {disks}
  </devices>
</domain>
"""


def disk_xml(path: Path, target: str = "vda", fmt: str = "raw", extra: str = "") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/>{extra}</disk>"
    )


def make_image(path: Path, fmt: str, size: int, *patterns: tuple[int, int, int], backing: Path | None = None) -> None:
    """An image with ``patterns`` (byte, offset, length) written by qemu-io."""
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", "raw"]
    subprocess.run([*args, str(path), str(size)], check=True)  # type: ignore[list-item]
    writes = [a for byte, off, n in patterns for a in ("-c", f"write -P {byte:#x} {off} {n}")]
    if writes:
        subprocess.run([QEMU_IO, "-f", fmt, *writes, str(path)], check=True, capture_output=True)  # type: ignore[list-item]


def same_content(a: Path, b: Path, fmt_a: str, fmt_b: str) -> bool:
    r = subprocess.run(
        [QEMU_IMG, "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],  # type: ignore[list-item]
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def start_guest(host: Host, name: str, disks: str) -> str:
    u = str(uuidlib.uuid4())
    host.define(guest_xml(name, u, disks), f"{name}.xml")
    host.migctl("start", name)
    return u


def jobinfo(host: Host, name: str) -> dict[str, str]:
    out = host.migctl("domjobinfo", "--completed", name).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def state(host: Host, name: str) -> str:
    r = host.migctl("domstate", name, check=False)
    return r.stdout.strip() if r.returncode == 0 else "absent"


@pytest.mark.parametrize("mode", [["--p2p"], []], ids=["p2p", "client-driven"])
def test_copy_storage_all_moves_the_disk(
    lab: tuple[Host, Host, Path], mode: list[str], request: pytest.FixtureRequest
) -> None:
    a, b, images = lab
    name = f"copyall-{request.node.callspec.id}"
    image = images / f"{name}.img"
    make_image(disks_of(a) / image.name, "raw", 32 * MIB, (0xAB, 0, 4 * MIB), (0x5C, 20 * MIB, MIB))
    u = start_guest(a, name, disk_xml(image))
    assert not (disks_of(b) / image.name).exists()
    a.migctl(*LIVE, *mode, "--copy-storage-all", name, b.dst, timeout=180)
    assert state(b, name) == "running" and state(a, name) == "shut off"
    with qmp_for(b.state_dir, u) as q:  # the destination's guest runs on its own copy
        blocks = {n["node-name"]: n for n in q.cmd("query-named-block-nodes", flat=True)}
    assert blocks["libvirt-1-format"]["image"]["filename"] == str(image)
    info = jobinfo(a, name)
    assert info["Job type"] == "Completed"
    assert info["File total"] == "32.000 MiB" and info["File remaining"] == "0.000 MiB"
    b.migctl("destroy", name)
    assert same_content(disks_of(a) / image.name, disks_of(b) / image.name, "raw", "raw")
    b.migctl("undefine", name)
    a.migctl("undefine", name)
    settled(a, b)
