"""A private Docker lab: a dockerd of its own inside a network namespace with only loopback.

Nothing started here can reach off the machine: the namespace has no interface but ``lo``
(dockerd adds its bridges inside it, so containers reach each other and nothing else), and
the daemon's data and exec roots, socket and pidfile are the lab's own, so it never meets a
system dockerd or another lab. The base image is built with debootstrap from the mirror apt
already uses, and the project image from wheels made on the host: no registry is needed.

Used by test_compose.py. ``python3 tests/container/lab.py base`` builds (or finds) the
cached base rootfs tarball and prints its path, e.g. to warm a CI cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("VMMIGRATE_LAB_CACHE", "/var/cache/vmmigrate-test"))
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
BASE_IMAGE = "vmmigrate-base:bookworm"
PROJECT_IMAGE = "vmmigrate:test"
APT_PACKAGES = ("docker.io", "docker-compose", "debootstrap")


def missing_tools() -> list[str]:
    """Programs the lab needs that are not on PATH."""
    tools = ("dockerd", "docker", "docker-compose", "debootstrap", "ip", "nsenter")
    return [t for t in tools if shutil.which(t) is None]


def install_docker() -> None:
    """apt-get the lab's packages (root only); raises CalledProcessError when apt cannot."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    subprocess.run(cmd, check=True, env=env, capture_output=True)


def apt_mirror() -> str:
    """The Debian mirror apt is configured with (debootstrap must use the same one)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        uris, suites = "", ""
        for line in [*path.read_text().splitlines(), ""]:
            key, _, value = line.partition(":")
            if key.strip() == "URIs":
                uris = value.strip()
            elif key.strip() == "Suites":
                suites = value.strip()
            elif not line.strip() and uris:
                if SUITE in suites.split() and "security" not in uris:
                    return uris.split()[0]
                uris, suites = "", ""
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["deb"] and SUITE in words and "debian" in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def umount_under(path: Path) -> None:
    """Lazily unmount everything mounted below path, deepest first."""
    mounts = subprocess.run(["findmnt", "-rno", "TARGET"], capture_output=True, text=True)
    for target in sorted(mounts.stdout.split(), reverse=True):
        if target.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", target], capture_output=True)


def base_rootfs_tar(cache_dir: Path = CACHE_DIR) -> Path:
    """A minbase bookworm rootfs with python3 and venv, as a tarball cached by its recipe.

    debootstrap takes minutes; the tarball is keyed by everything that shapes it (suite,
    variant, packages, mirror), so a changed recipe builds a new one instead of reusing a
    stale one. Written under a temporary name and renamed, so a killed run leaves no torn
    tarball behind for the next one to trust.
    """
    mirror = apt_mirror()
    recipe = f"{SUITE}|minbase|{','.join(BASE_PACKAGES)}|{mirror}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    tarball = cache_dir / f"rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}"]
        try:
            subprocess.run([*cmd, SUITE, str(rootfs), mirror], check=True, capture_output=True)
        finally:
            # a failed debootstrap leaves the chroot's /proc and /sys mounted: removing the
            # temporary directory would otherwise walk into the host's
            umount_under(rootfs)
        # the downloaded .debs are a third of the tree and no use in an image
        for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        part = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(part), "."], check=True)
        part.rename(tarball)
    return tarball


class Lab:
    """One dockerd in its own network namespace; see the module docstring."""

    def __init__(self, root: Path | None = None) -> None:
        self.tag = f"vmm-dock-{os.getpid()}"
        self.netns = self.tag
        # compose project names are [a-z0-9_-]; v1 drops "-", so none to begin with
        self.project = self.tag.replace("-", "")
        # Not /tmp: overlay2 wants a filesystem that supports it as upper dir (ext4 here,
        # while /tmp may be a tmpfs or overlay itself in some CI runners).
        self.root = root or Path("/var/lib/vmmigrate-test") / self.tag
        self.sock = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.log = self.root / "dockerd.log"
        # exec-root holds unix sockets (containerd's, the shims'): its path must stay well
        # under the 108-byte sun_path limit, hence a short one under /run.
        self.exec_root = Path("/run") / self.tag
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        # DOCKER_BUILDKIT=0: a newer docker CLI on PATH would ask for buildx, which Debian's
        # docker.io does not ship; the classic builder is all the Dockerfile needs
        return {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_BUILDKIT": "0",
            "VMMIGRATE_IMAGE": PROJECT_IMAGE,  # what docker-compose.yml runs
        }

    def start(self, timeout: float = 60.0) -> None:
        """Make the namespace, start dockerd inside it, wait until it answers."""
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        ns = f"/run/netns/{self.netns}"
        subprocess.run(["nsenter", f"--net={ns}", "ip", "link", "set", "lo", "up"], check=True)
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            "nsenter", f"--net={ns}",
            "dockerd",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.exec_root),
            "-H", f"unix://{self.sock}",
            "--pidfile", str(self.pidfile),
            "--storage-driver", os.environ.get("VMMIGRATE_LAB_STORAGE", "overlay2"),
            # cgroups are not namespaced here (v1, no cgroupns): a parent of the lab's own
            # keeps its containers apart from a system dockerd's "docker" and other labs'
            "--cgroup-parent", f"/{self.tag}",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"dockerd did not answer in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM dockerd (it stops its containers and containerd), then remove everything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # overlay and netns mounts of a dockerd that died hard would pin the data root
        umount_under(self.root)
        umount_under(self.exec_root)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        # dockerd removes its containers' cgroups, not the parent it was given
        cgroups = Path("/sys/fs/cgroup")
        for parent in [*cgroups.glob(f"*/{self.tag}"), cgroups / self.tag]:
            with contextlib.suppress(OSError):
                parent.rmdir()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)

    def docker(
        self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return self._run(["docker", *args], check=check, input=input, timeout=timeout)

    def compose_cmd(self, project_dir: Path) -> list[str]:
        """docker-compose on project_dir's docker-compose.yml, as this lab's own project."""
        cmd = ["docker-compose", "--project-directory", str(project_dir)]
        return [*cmd, "-f", str(project_dir / "docker-compose.yml"), "-p", self.project]

    def compose(
        self,
        project_dir: Path,
        *args: str,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose_cmd(project_dir), *args]
        return self._run(cmd, check=check, input=input, timeout=timeout)

    def _run(
        self, cmd: Sequence[str], *, check: bool, input: bytes | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            list(cmd), env=self.env, input=input, capture_output=True, timeout=timeout
        )
        out = subprocess.CompletedProcess(
            res.args, res.returncode, res.stdout.decode(errors="replace"),
            res.stderr.decode(errors="replace"),
        )  # fmt: skip
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}\n{out.stdout}{out.stderr}")
        return out

    def import_base(self, cache_dir: Path = CACHE_DIR) -> None:
        """docker import the cached debootstrap rootfs as BASE_IMAGE."""
        tarball = base_rootfs_tar(cache_dir)
        with tarball.open("rb") as f:
            res = subprocess.run(
                ["docker", "import", "-", BASE_IMAGE], env=self.env, stdin=f, capture_output=True
            )
        if res.returncode != 0:
            raise RuntimeError(f"docker import failed: {res.stderr.decode(errors='replace')}")

    def build_project(self, wheels: Path | None = None) -> None:
        """The project image on BASE_IMAGE from host-made wheels (nothing downloaded inside)."""
        with tempfile.TemporaryDirectory(prefix="vmm-ctx-") as ctx:
            context = stage_context(Path(ctx), wheels)
            self.docker(
                "build", "-q", "-t", PROJECT_IMAGE, "--build-arg", f"BASE={BASE_IMAGE}",
                "-f", str(context / "docker/Dockerfile"), str(context),
            )  # fmt: skip


def make_wheels(dest: Path) -> Path:
    """pip wheel the project and its runtime dependencies with the host's pip (its index)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(dest), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True)
    return dest


def stage_context(ctx: Path, wheels: Path | None) -> Path:
    """A build context with only what the image needs: wheels/ and docker/."""
    shutil.copytree(REPO / "docker", ctx / "docker")
    if wheels is None:
        make_wheels(ctx / "wheels")
    else:
        shutil.copytree(wheels, ctx / "wheels")
    return ctx


@contextlib.contextmanager
def running_lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["base"]:
        print(base_rootfs_tar())
