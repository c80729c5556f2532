"""A real Linux guest for the tests: Debian's cloud kernel, a busybox initramfs, a virtio disk.

The guest counts every ~100 ms; each count N goes first to its virtio disk (a 512-byte record
in slot N mod SLOTS, O_DIRECT and fsync) and then to the serial console as "count N", so the
console of either host can be checked against the disk after a migration (the record layout is
described in tests/data/guest/init).

Everything fetched or built is cached under CACHE_DIR (/var/cache/vmmigrate-test/guest, or
$VMMIGRATE_GUEST_CACHE), keyed by package version or by the inputs' digest: the kernel comes
from `apt-get download` of the versioned package that `linux-image-cloud-amd64` depends on,
unpacked with `dpkg-deb -x`; busybox from busybox-static; cpio and qemu-img are used from
the host when installed, else unpacked from their packages the same way. Anything missing
raises GuestUnavailable, which tests turn into a skip with its reason.

`python -m helpers.guest` (from tests/) fetches and builds everything, e.g. to warm a CI cache.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .qmp import QMP

CACHE_DIR = Path(os.environ.get("VMMIGRATE_GUEST_CACHE", "/var/cache/vmmigrate-test/guest"))
INIT_SCRIPT = Path(__file__).resolve().parent.parent / "data" / "guest" / "init"
KERNEL_META = "linux-image-cloud-amd64"
# What /init loads; their dependencies are added from each module's depends= field. The
# balloon driver gives memory back when a domain's <currentMemory> is below its <memory>.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_balloon")
SLOTS = 64
RECORD = 512
HEADER = 64
MAGIC = b"VMMG "
QEMU = shutil.which("qemu-system-x86_64")


class GuestUnavailable(Exception):
    """Something the guest needs cannot be had here (no QEMU, no package, no mirror)."""


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    try:
        res = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestUnavailable(f"{cmd[0]}: {e}") from e
    if res.returncode != 0:
        raise GuestUnavailable(f"{' '.join(cmd)}: {res.stderr.strip()[-400:]}")
    return res.stdout


# ---- packages ----------------------------------------------------------------------------


# apt-cache takes most of a second per call here: ask once per process.
@functools.cache
def kernel_package() -> str:
    """The versioned kernel package the metapackage depends on (local apt lists only)."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise GuestUnavailable(f"apt-cache: {KERNEL_META} depends on no linux-image package")


@functools.cache
def candidate_version(package: str) -> str:
    out = _run(["apt-cache", "policy", package])
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise GuestUnavailable(f"apt-cache: no candidate version of {package}")
    return m.group(1)


def unpacked(package: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The package's files, from `apt-get download` + `dpkg-deb -x`, cached by version."""
    version = candidate_version(package)
    root = cache_dir / "debs" / f"{package}_{version.replace(':', '%3a')}"
    if root.is_dir():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GuestUnavailable(f"cache {cache_dir}: {e} (set VMMIGRATE_GUEST_CACHE)") from e
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        # apt-get drops root to _apt for the download when it can: give it the directory.
        if _has_user("_apt"):
            shutil.chown(tmp, user="_apt")
        _run(["apt-get", "download", f"{package}={version}"], cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise GuestUnavailable(f"apt-get download {package}: got {debs}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "root")])
        try:
            os.rename(Path(tmp) / "root", root)
        except OSError:
            if not root.is_dir():  # else a concurrent run unpacked the same version first
                raise
    return root


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def tool(name: str, package: str, cache_dir: Path = CACHE_DIR) -> Path:
    """A host tool, from PATH when installed, else unpacked from its package."""
    found = shutil.which(name)
    if found:
        return Path(found)
    root = unpacked(package, cache_dir)
    for path in (root / "usr" / "bin" / name, root / "bin" / name):
        if path.exists():
            return path
    raise GuestUnavailable(f"{package} has no usr/bin/{name} or bin/{name}")


def busybox(cache_dir: Path = CACHE_DIR) -> Path:
    """A static busybox (the initramfs holds no libraries): the installed busybox-static's,
    else one unpacked from the package."""
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
        capture_output=True,
        text=True,
        check=False,
    )
    if status.stdout.endswith(" installed") and Path("/bin/busybox").exists():
        return Path("/bin/busybox")
    path = unpacked("busybox-static", cache_dir) / "bin" / "busybox"
    if not path.exists():
        raise GuestUnavailable("busybox-static has no bin/busybox")
    return path


# ---- kernel ------------------------------------------------------------------------------


@dataclass
class Kernel:
    vmlinuz: Path
    modules: list[Path]  # in load order
    key: str


def module_depends(ko: Path) -> list[str]:
    """The depends= field of a module's .modinfo section (no modinfo needed)."""
    m = re.search(rb"\x00depends=([^\x00]*)\x00", b"\x00" + ko.read_bytes())
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def load_order(by_name: dict[str, Path], wanted: tuple[str, ...]) -> list[str]:
    """Wanted modules and their dependencies, every module after what it depends on."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise GuestUnavailable(f"module dependency cycle: {' -> '.join(path)}")
        if name not in by_name:
            raise GuestUnavailable(f"kernel has no module {name} (built in?)")
        for dep in module_depends(by_name[name]):
            visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def kernel(cache_dir: Path = CACHE_DIR) -> Kernel:
    package = kernel_package()
    root = unpacked(package, cache_dir)
    vmlinuz = next((root / "boot").glob("vmlinuz-*"), None)
    if vmlinuz is None:
        raise GuestUnavailable(f"{package} has no boot/vmlinuz-*")
    by_name: dict[str, Path] = {}
    for ko in (root / "lib" / "modules").glob("*/kernel/**/*.ko"):
        by_name[ko.stem.replace("-", "_")] = ko
    order = load_order(by_name, WANTED_MODULES)
    return Kernel(vmlinuz, [by_name[n] for n in order], root.name)


# ---- initramfs ---------------------------------------------------------------------------


def build_initramfs(out: Path, kern: Kernel, bb: Path, cpio: Path) -> None:
    """A gzip'd newc cpio: busybox, /init, the modules flat in /lib/modules, the slot count."""
    with tempfile.TemporaryDirectory(prefix="initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "etc", "lib/modules", "proc", "sys", "run"):
            (root / d).mkdir(parents=True)
        shutil.copy(bb, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        shutil.copy(INIT_SCRIPT, root / "init")
        (root / "init").chmod(0o755)
        for ko in kern.modules:
            shutil.copy(ko, root / "lib" / "modules" / f"{ko.stem}.ko")
        names = " ".join(ko.stem for ko in kern.modules)
        (root / "etc" / "modules-order").write_text(names + "\n")
        (root / "etc" / "slots").write_text(f"{SLOTS}\n")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            [str(cpio), "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            input="\n".join(files).encode() + b"\n",
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise GuestUnavailable(f"cpio: {archive.stderr.decode().strip()}")
    part = out.with_name(f"{out.name}.{os.getpid()}.part")  # concurrent builders
    part.write_bytes(gzip.compress(archive.stdout, compresslevel=6))
    os.replace(part, out)


@dataclass
class Image:
    """What QEMU boots: the kernel and the initramfs (both cached)."""

    vmlinuz: Path
    initrd: Path
    timings: dict[str, float] = field(default_factory=dict)


def image(cache_dir: Path = CACHE_DIR) -> Image:
    """Fetch (or find cached) everything and build (or find cached) the initramfs."""
    if QEMU is None:
        raise GuestUnavailable("QEMU not installed (qemu-system-x86)")
    t0 = time.monotonic()
    kern = kernel(cache_dir)
    bb = busybox(cache_dir)
    cpio = tool("cpio", "cpio", cache_dir)
    t1 = time.monotonic()
    digest = hashlib.sha256()
    for part in (kern.key, str(bb), INIT_SCRIPT.read_text(), str(SLOTS), *WANTED_MODULES):
        digest.update(part.encode() + b"\x00")
    initrd = cache_dir / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if not initrd.exists():
        build_initramfs(initrd, kern, bb, cpio)
    t2 = time.monotonic()
    return Image(kern.vmlinuz, initrd, {"fetch": t1 - t0, "initramfs": t2 - t1})


# ---- disks -------------------------------------------------------------------------------


def qemu_img(cache_dir: Path = CACHE_DIR) -> Path:
    path = tool("qemu-img", "qemu-utils", cache_dir)
    _run([str(path), "--version"])  # an unpacked one may lack its libraries
    return path


def create_disk(path: Path, fmt: str, size: int, pattern: bool = False) -> None:
    """A disk image; with pattern, every MiB past the first (which holds the records) is
    filled with data of its own, so that a storage copy moves the whole size and a
    block-for-block comparison after it means something."""
    img = str(qemu_img())
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw")
    _run([img, "create", "-q", "-f", "raw", str(raw), str(size)])
    if pattern:
        with raw.open("r+b") as f:
            for off in range(1 << 20, size, 1 << 20):
                f.seek(off)
                f.write(hashlib.sha256(str(off).encode()).digest() * (1 << 15))  # 1 MiB
    if fmt != "raw":
        _run([img, "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)])
        raw.unlink()


def read_head(path: Path, fmt: str, length: int = SLOTS * RECORD) -> bytes:
    if fmt == "raw":
        with path.open("rb") as f:
            return f.read(length)
    with tempfile.NamedTemporaryFile(suffix=".raw") as out:
        _run(
            [
                str(qemu_img()),
                "dd",
                "-f",
                fmt,
                "-O",
                "raw",
                "bs=512",
                f"count={length // 512}",
                f"if={path}",
                f"of={out.name}",
            ]
        )
        return Path(out.name).read_bytes()[:length]


@dataclass
class Records:
    counts: list[int]  # the valid records' counts
    torn: list[int]  # slots holding something that is neither empty nor a valid record

    @property
    def newest(self) -> int:
        return max(self.counts, default=0)


def parse_records(data: bytes) -> Records:
    counts: list[int] = []
    torn: list[int] = []
    for slot in range(len(data) // RECORD):
        rec = data[slot * RECORD : (slot + 1) * RECORD]
        if rec == bytes(RECORD):
            continue
        n = _record_count(rec)
        if n is None or n % SLOTS != slot:
            torn.append(slot)
        else:
            counts.append(n)
    return Records(sorted(counts), torn)


def _record_count(rec: bytes) -> int | None:
    head, body = rec[:HEADER], rec[HEADER:]
    m = re.fullmatch(rb"VMMG (\d{12}) ([0-9a-f]{32}) {13}\n", head)
    if not m or hashlib.md5(body).hexdigest().encode() != m.group(2):
        return None
    n = int(m.group(1))
    return n if body == b"%015d\n" % n * 28 else None


def disk_records(path: Path, fmt: str) -> Records:
    return parse_records(read_head(path, fmt))


def differing_blocks(a: Path, b: Path, block: int = 1 << 20) -> list[int]:
    """Offsets of the blocks where two raw images differ (sizes must match too)."""
    if a.stat().st_size != b.stat().st_size:
        return [-1]
    diff: list[int] = []
    with a.open("rb") as fa, b.open("rb") as fb:
        off = 0
        while chunk := fa.read(block):
            if chunk != fb.read(block):
                diff.append(off)
            off += block
    return diff


# ---- bare QEMU ---------------------------------------------------------------------------

COUNT_RE = re.compile(rb"^count (\d+)\r?$", re.M)


def wait_for_count(
    counts: Callable[[], list[int]], output: Callable[[], bytes], at_least: int, timeout: float,
    started: float, what: str, running: Callable[[], bool] = lambda: True,
) -> float:  # fmt: skip
    """Seconds since ``started`` (a monotonic time) when ``counts()`` (the guest's console
    counts) first ended with one >= at_least. Fails the test, with the end of ``output()``,
    after ``timeout`` seconds or once the guest is no longer ``running()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = counts()
        if seen and seen[-1] >= at_least:
            return time.monotonic() - started
        if not running():
            break
        time.sleep(0.02)
    tail = output()[-1500:].decode(errors="replace")
    raise AssertionError(f"{what}: no count {at_least} within {timeout}s: {tail!r}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Guest:
    """One bare QEMU running the guest: TCG, q35, direct kernel boot, a virtio disk, a virtio
    NIC on user networking that reaches nothing (restrict=on), serial to a file, QMP on a
    unix socket. With incoming, QEMU waits for a migration (-incoming defer, so the caller
    can set up an NBD server first) and stays paused (-S) until cont, as libvirt does."""

    def __init__(
        self,
        img: Image,
        disk: Path,
        fmt: str,
        workdir: Path,
        name: str,
        incoming: bool = False,
        memory_mib: int = 256,
    ) -> None:
        assert QEMU is not None
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.serial = workdir / f"{name}.serial"
        self.qmp_path = workdir / f"{name}.qmp"
        self.log = workdir / f"{name}.log"
        self.argv = [
            QEMU, "-name", name, "-machine", "q35", "-accel", "tcg", "-m", str(memory_mib),
            "-smp", "1", "-nodefaults", "-display", "none", "-no-user-config",
            "-kernel", str(img.vmlinuz), "-initrd", str(img.initrd),
            "-append", "console=ttyS0 quiet panic=-1", "-no-reboot",
            "-drive", f"file={disk},format={fmt},if=none,id=disk0,cache=none",
            "-device", "virtio-blk-pci,drive=disk0,id=vdisk0",
            "-netdev", "user,id=net0,restrict=on",
            "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if incoming:
            self.argv += ["-S", "-incoming", "defer"]
        self.started = time.monotonic()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.qmp = self._connect()

    def _connect(self, timeout: float = 20.0) -> QMP:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU {self.name} exited: {self.log.read_text()[-800:]}")
            # QMP leaves its socket open when connect fails: try only once QEMU listens.
            if self.qmp_path.exists():
                return QMP(str(self.qmp_path), timeout=30.0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU {self.name}: no QMP socket after {timeout}s")
            time.sleep(0.05)

    def cmd(self, name: str, **arguments: Any) -> Any:
        return self.qmp.cmd(name, **arguments)

    def output(self) -> bytes:
        return self.serial.read_bytes() if self.serial.exists() else b""

    def counts(self) -> list[int]:
        return [int(m) for m in COUNT_RE.findall(self.output())]

    def wait_for_count(self, at_least: int, timeout: float = 60.0) -> float:
        """Seconds since QEMU started when the console first showed a count >= at_least."""
        return wait_for_count(
            self.counts, self.output, at_least, timeout, self.started, self.name,
            running=lambda: self.proc.poll() is None,
        )  # fmt: skip

    def status(self) -> str:
        status: str = self.cmd("query-status")["status"]
        return status

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU (flushing its disk), killing it if it does not go."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.cmd("quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.qmp.close()


def wait_migration(g: Guest, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: dict[str, Any] = g.cmd("query-migrate")
        if info.get("status") == "completed":
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"{g.name}: migration {info.get('status')}: {json.dumps(info)}")
        time.sleep(0.02)
    raise TimeoutError(f"{g.name}: migration still running after {timeout}s")


def incoming_port(dst: Guest) -> int:
    """Start listening for the migration on a port of the kernel's choosing and return it."""
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    for addr in dst.cmd("query-migrate").get("socket-address", []):
        if addr.get("type") == "inet":
            return int(addr["port"])
    raise RuntimeError(f"{dst.name}: query-migrate names no listening port")


def migrate(src: Guest, dst: Guest, resume: bool = True) -> float:
    """Live-migrate src's memory and devices to dst (waiting with -incoming defer) and, with
    resume, resume dst; returns the wall time from `migrate` to then. Bandwidth is unlimited,
    as libvirt sets it (QEMU's own default is 32 MiB/s)."""
    port = incoming_port(dst)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    t0 = time.monotonic()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_migration(src)
    wait_migration(dst)
    if resume:
        dst.cmd("cont")
    return time.monotonic() - t0


def start_nbd_export(dst: Guest, device: str = "disk0") -> int:
    """The destination's half of a storage copy: an NBD server exporting its (empty) disk."""
    port = free_port()
    dst.cmd(
        "nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
    )
    dst.cmd("nbd-server-add", device=device, writable=True)
    return port


def mirror_to_nbd(src: Guest, port: int, device: str = "disk0", timeout: float = 300) -> None:
    """The source's half: mirror the disk onto the destination's export until ready (the
    mirror then keeps both in step until it is cancelled)."""
    src.cmd(
        "drive-mirror",
        device=device,
        **{"job-id": f"mirror-{device}"},
        target=f"nbd:127.0.0.1:{port}:exportname={device}",
        format="raw",
        sync="full",
        mode="existing",
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["device"]: j for j in src.cmd("query-block-jobs")}
        job = jobs.get(f"mirror-{device}")
        if job is None:
            raise RuntimeError(f"{src.name}: mirror of {device} ended before ready")
        if job.get("ready"):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{src.name}: mirror of {device} not ready after {timeout}s")


def end_mirror(src: Guest, device: str = "disk0", timeout: float = 60) -> None:
    """Cancel a ready mirror (the target keeps what was mirrored: libvirt's way once the
    source is paused after migrating) and wait for the job to go."""
    src.cmd("block-job-cancel", device=f"mirror-{device}")
    deadline = time.monotonic() + timeout
    while any(j["device"] == f"mirror-{device}" for j in src.cmd("query-block-jobs")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{src.name}: mirror of {device} still there")
        time.sleep(0.05)


if __name__ == "__main__":
    result = image()
    print(
        json.dumps({"vmlinuz": str(result.vmlinuz), "initrd": str(result.initrd), **result.timings})
    )
