"""Two hosts in two network namespaces, joined by a bridge in a third one.

    ns vmmbr-PID-N:  bridge br0 --- va (veth) ... eth0 in ns vmmA-PID-N   10.231.X.1/24
                                --- vb (veth) ... eth0 in ns vmmB-PID-N   10.231.X.2/24

Every name carries the pid of the test run (and a counter), so parallel or left-over runs never
collide; the 10.231.X.0/24 addresses exist only inside these namespaces. Nothing is done in the
root namespace besides creating and deleting the namespaces themselves.

Creating namespaces needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's ``ip``; without
them every test here is skipped with a reason, before anything is touched.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path

from helpers.hosts import Host

SKIP_REASON = "needs root and iproute2 to create network namespaces"
IP = shutil.which("ip")

_networks = itertools.count()


class NetnsError(RuntimeError):
    pass


class NetnsUnavailable(NetnsError):
    """The first `ip netns add` failed: no rights to make namespaces here."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert IP is not None
    r = subprocess.run(
        [IP, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (cheap checks first), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"{SKIP_REASON} (not running as root)"
    if IP is None:
        return f"{SKIP_REASON} (no 'ip' command found)"
    return None


class Network:
    """Three namespaces: a bridge and two hosts, A (10.231.X.1) and B (10.231.X.2)."""

    IFACE = "eth0"  # the host end of each veth, inside vmA / vmB

    def __init__(self) -> None:
        n = next(_networks)
        tag = f"{os.getpid()}-{n}"
        self.subnet = f"10.231.{(os.getpid() + n) % 250 + 1}"
        self.bridge_ns = f"vmmbr-{tag}"
        self.ns_a = f"vmmA-{tag}"
        self.ns_b = f"vmmB-{tag}"
        self.ip_a = f"{self.subnet}.1"
        self.ip_b = f"{self.subnet}.2"
        self.created: list[str] = []

    def prefix(self, ns: str) -> list[str]:
        assert IP is not None
        return [IP, "netns", "exec", ns]

    def create(self) -> None:
        """Build everything; on failure, undo what was built and re-raise."""
        try:
            for ns in (self.bridge_ns, self.ns_a, self.ns_b):
                r = ip("netns", "add", ns, check=False)
                if r.returncode != 0 and not self.created:
                    raise NetnsUnavailable(f"ip netns add {ns}: {r.stderr.strip()}")
                if r.returncode != 0:
                    raise NetnsError(f"ip netns add {ns} failed: {r.stderr.strip()}")
                self.created.append(ns)
                ip("-n", ns, "link", "set", "lo", "up")
            br = self.bridge_ns
            ip(
                "-n",
                br,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            )
            ip("-n", br, "link", "set", "br0", "up")
            for port, ns, addr in (("va", self.ns_a, self.ip_a), ("vb", self.ns_b, self.ip_b)):
                ip(
                    "-n",
                    br,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    self.IFACE,
                    "netns",
                    ns,
                )
                ip("-n", br, "link", "set", port, "master", "br0")
                ip("-n", br, "link", "set", port, "up")
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.IFACE)
                ip("-n", ns, "link", "set", self.IFACE, "up")
            self.wait_oper_up(self.ns_a)
            self.wait_oper_up(self.ns_b)
        except BaseException:
            self.destroy()
            raise

    def oper_state(self, ns: str, iface: str = IFACE) -> str:
        out = ip("-n", ns, "-o", "link", "show", "dev", iface).stdout
        words = out.split()
        return words[words.index("state") + 1] if "state" in words else "UNKNOWN"

    def wait_oper_up(self, ns: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.oper_state(ns) != "UP":
            if time.monotonic() > deadline:
                raise NetnsError(f"{self.IFACE} in {ns} not UP after {timeout}s")
            time.sleep(0.05)

    def link(self, ns: str, up: bool) -> None:
        ip("-n", ns, "link", "set", self.IFACE, "up" if up else "down")
        if up:
            self.wait_oper_up(ns)

    def destroy(self) -> None:
        """Delete our namespaces (their veths and the bridge go with them). Only our daemons
        ran inside; they are stopped (by pid, through Host.stop) before this is called."""
        errors = []
        for ns in reversed(self.created):
            left = ip("netns", "pids", ns, check=False).stdout.split()
            if left:
                errors.append(f"processes still in {ns}: {' '.join(left)}")
            r = ip("netns", "del", ns, check=False)
            if r.returncode != 0:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        self.created.clear()
        if errors:
            raise NetnsError("; ".join(errors))


# Namespace addresses are not loopback: plaintext there needs --insecure on every daemon and
# every migctl (these tests are about the network; tests/netns/test_tls_netns.py about TLS).
INSECURE = ("--insecure",)


def start_hosts(net: Network, base: Path, *, srcd_a: tuple[str, ...] = ()) -> tuple[Host, Host]:
    """srcd + dstd of host A inside vmA on A's address, the same for B in vmB (port 0)."""
    a = Host("A", net.ip_a, base / "A", prefix=net.prefix(net.ns_a), migctl_args=INSECURE)
    b = Host("B", net.ip_b, base / "B", prefix=net.prefix(net.ns_b), migctl_args=INSECURE)
    try:
        a.start(srcd_args=(*INSECURE, *srcd_a), dstd_args=INSECURE)
        b.start(srcd_args=INSECURE, dstd_args=INSECURE)
    except BaseException:
        a.stop()
        b.stop()
        raise
    return a, b
