"""Plaintext on an address that is not loopback: refused without --insecure, with a message
that says what to do; accepted with --insecure (and a warning); TLS on the same address,
with certificates naming it, works without either. The address is inside a network
namespace this test made (tests/netns/netlab.py), never on the machine's own network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.hosts import Host
from vmmigrate.migctl import certs

from .netlab import Network

pytestmark = [pytest.mark.netns]


def _run_daemon(net: Network, kind: str, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [*net.prefix(net.ns_a), sys.executable, "-m", f"vmmigrate.{kind}",
           "--listen", f"{net.ip_a}:0", "--state-dir", str(state), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", ["srcd", "dstd"])
def test_plaintext_refused_without_insecure(network: Network, tmp_path: Path, kind: str) -> None:
    r = _run_daemon(network, kind, tmp_path / "state")
    assert r.returncode == 1, r.stderr
    assert f"{kind}: error: refusing to listen in plaintext on {network.ip_a}:0" in r.stderr
    assert "--tls-dir DIR" in r.stderr and "--insecure" in r.stderr
    assert not (tmp_path / "state").exists()  # refused before touching its state


def test_insecure_starts_with_a_warning_and_tls_needs_no_flag(network: Network,
                                                             tmp_path: Path) -> None:
    a = Host("A", network.ip_a, tmp_path / "A", prefix=network.prefix(network.ns_a),
             migctl_args=["--insecure"])
    try:
        a.start(srcd_args=["--insecure"], dstd_args=["--insecure"])
        for daemon in (a.srcd, a.dstd):
            assert daemon is not None
            assert any(e.get("event") == "plaintext_insecure" for e in daemon.events())
        assert a.names() == []
        # migctl refuses plaintext to it without --insecure too
        a.migctl_args = []
        r = a.migctl("list", check=False)
        assert r.returncode == 1 and "no TLS material to reach" in r.stderr
    finally:
        a.stop()
    certs.init_ca(tmp_path / "ca")
    certs.issue_host(tmp_path / "ca", name="hosta", ips=[network.ip_a], out=tmp_path / "host")
    certs.issue_client(tmp_path / "ca", name="op", role="admin", out=tmp_path / "client")
    t = Host("A", network.ip_a, tmp_path / "T", prefix=network.prefix(network.ns_a),
             migctl_args=["--tls-dir", str(tmp_path / "client")])
    try:
        tls = ["--tls-dir", str(tmp_path / "host")]
        t.start(srcd_args=tls, dstd_args=tls)
        assert t.names() == []
    finally:
        t.stop()
