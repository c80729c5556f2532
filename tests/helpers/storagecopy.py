"""Two hosts with storage of their own on one machine, for the storage-copy tests
(test_storage_copy.py, test_guest_copy.py), and migctl migrations run in the background.

Each host runs in a mount namespace of its own (helpers/mountns.py) in which one image
directory (the same path on every host) is a directory private to the host: a domain's XML
names one path, and each host has its own file there. dstd may create disks in it
(--storage-dir). The test sees a host's files in its private directory (:meth:`Site.own`),
or runs a command inside the host's namespace (:meth:`Site.run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from helpers import mountns
from helpers.hosts import Host, wait_until

SRCD_RPC_TIMEOUT = 6.0  # srcd's peer deadline: its keepalive probes every 2 s during Perform
# (name, address, more nsenter options: e.g. a network namespace) of each host
LOOPBACK: tuple[tuple[str, str, list[str]], ...] = (("A", "127.0.0.2", []), ("B", "127.0.0.3", []))


@dataclasses.dataclass
class Site:
    """A host and its mount namespace."""

    host: Host
    ns: mountns.MountNamespace

    def own(self, path: Path) -> Path:
        """Where the test sees this host's file at the common ``path``."""
        return self.ns.private / path.relative_to(self.ns.common)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command as this host sees the files (with ``check``, a failure fails the test)."""
        return self.ns.run(*cmd, check=check)


def srcd_args(*extra: str) -> list[str]:
    return [*extra, "--rpc-timeout", str(SRCD_RPC_TIMEOUT)]


def dstd_args(images: Path, *extra: str) -> list[str]:
    return ["--storage-dir", str(images), *extra]


@contextlib.contextmanager
def sites(
    base: Path, addresses: Sequence[tuple[str, str, list[str]]] = LOOPBACK,
    daemon_args: Sequence[str] = (), migctl_args: Sequence[str] = (),
    b_dstd_args: Sequence[str] = (),
) -> Iterator[tuple[Site, Site, Path]]:  # fmt: skip
    """Hosts A and B (see LOOPBACK), each in a mount namespace of its own in which
    ``base/images`` is its private directory; yields them and the common image directory.
    Skips the test where mount namespaces cannot be made. Stops the daemons, their
    emulators and the namespaces."""
    reason = mountns.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    images = base / "images"
    made: list[Site] = []
    try:
        for name, ip, outer in addresses:
            ns = mountns.MountNamespace(base / f"{name}-images", images)
            prefix = [ns.prefix[0], *outer, *ns.prefix[1:]]  # nsenter --net=... --mount=...
            host = Host(name, ip, base / name, prefix=prefix, migctl_args=migctl_args)
            made.append(Site(host, ns))
            extra = b_dstd_args if name == "B" else ()
            host.start(srcd_args=srcd_args(*daemon_args),
                       dstd_args=dstd_args(images, *daemon_args, *extra))  # fmt: skip
        yield made[0], made[1], images
    finally:
        for site in made:
            site.host.stop()
        for site in made:
            site.ns.stop()


def start_migration(host: Host, *args: str) -> subprocess.Popen[str]:
    """``migctl ARGS`` as ``host`` runs it (in its namespaces), in the background (its
    result is read with communicate() or failed_with())."""
    cmd = [sys.executable, "-m", "vmmigrate.migctl", "-c", host.src, *host.migctl_args, *args]
    return subprocess.Popen(
        [*host.prefix, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def domjobinfo(host: Host, name: str, *options: str) -> dict[str, str]:
    """``migctl domjobinfo [OPTIONS] NAME``'s lines, by their label."""
    out = host.migctl("domjobinfo", *options, name).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def copying(host: Host, name: str) -> bool:
    """The source's job shows disk bytes moving (domjobinfo's File lines)."""
    return domjobinfo(host, name).get("File processed", "0.000 MiB") != "0.000 MiB"


@contextlib.contextmanager
def copy_under_way(host: Host, name: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``migctl ARGS``, a migration of ``name`` with storage copy, in the background from
    ``host``, caught once its disk copy has started; killed at the end if it still runs."""
    migration = start_migration(host, *args)
    try:
        wait_until(lambda: copying(host, name), 60, "the disk copy to start")
        yield migration
    finally:
        if migration.poll() is None:
            migration.kill()
            migration.communicate()


def failed_with(migration: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """migctl's output and the last line of its errors, once it failed (within
    ``timeout``)."""
    out, err = migration.communicate(timeout=timeout)
    assert migration.returncode == 1, (out, err)
    return out, err.strip().splitlines()[-1]
