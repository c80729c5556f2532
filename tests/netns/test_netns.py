"""Offline migration between two hosts in two network namespaces (root only).

The loopback scenarios of tests/integration/test_offline.py, but every daemon and every migctl
runs inside its host's namespace (``ip netns exec``) and listens on that namespace's own
address, so the hosts reach each other only over the veth/bridge link, which a test can cut.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.hosts import Host, sample_domain_xml
from vmmigrate.common.domainxml import canonical

from .netlab import Network, start_hosts

pytestmark = [pytest.mark.netns, pytest.mark.slow]

OFFLINE = ("migrate", "--offline", "--persistent")
PARTITION_RPC_TIMEOUT = 2.0
# what a migctl run may take on top of srcd's RPC deadline (interpreter start-up, the
# client's own calls, a loaded CI machine)
SLACK = 8.0
# how long after the link comes back a migration may still fail (see migrate_until_ok)
RECONNECT_GRACE = 10.0


def dumpxml(h: Host, name: str) -> str:
    return h.migctl("dumpxml", name).stdout


def define(h: Host, name: str) -> str:
    u = str(uuidlib.uuid4())
    h.define(sample_domain_xml(name, u), f"{name}.xml")
    return u


def mode_args(mode: str) -> list[str]:
    return ["--p2p"] if mode == "p2p" else []


def test_daemons_listen_on_namespace_addresses(
    network: Network, ns_hosts: tuple[Host, Host]
) -> None:
    a, b = ns_hosts
    for h, addr in ((a, network.ip_a), (b, network.ip_b)):
        for d in (h.srcd, h.dstd):
            assert d is not None
            assert d.address.rsplit(":", 1)[0] == addr, d.address
            assert int(d.address.rsplit(":", 1)[1]) > 0


def test_p2p_there_and_client_driven_back(ns_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = ns_hosts
    name = domname
    u = define(a, name)
    before = dumpxml(a, name)

    r = a.migctl(*OFFLINE, "--p2p", "--undefinesource", name, b.dst)
    assert (r.stdout, r.stderr) == ("", "")
    assert name in b.names() and name not in a.names()
    after = dumpxml(b, name)
    assert after.strip() == before.strip()  # verbatim, comments included
    assert canonical(after) == canonical(before)
    assert b.migctl("domstate", name).stdout.strip() == "shut off"
    info = b.migctl("dominfo", name).stdout
    assert f"UUID:           {u}" in info
    assert "Persistent:     yes" in info
    assert a.journal() == [] and b.journal() == []

    # back, client-driven: migctl in vmB drives B's srcd and A's dstd across the link
    r = b.migctl(*OFFLINE, "--undefinesource", name, a.dst)
    assert (r.stdout, r.stderr) == ("", "")
    assert name in a.names() and name not in b.names()
    assert dumpxml(a, name).strip() == before.strip()
    assert a.migctl("domuuid", name).stdout.strip() == u
    assert a.journal() == [] and b.journal() == []


@pytest.mark.parametrize("mode", ["p2p", "managed"])
def test_dname_across_namespaces(ns_hosts: tuple[Host, Host], domname: str, mode: str) -> None:
    a, b = ns_hosts
    name, new = domname, f"{domname}-renamed"
    u = define(a, name)
    a.migctl(*OFFLINE, *mode_args(mode), "--undefinesource", "--dname", new, name, b.dst)
    assert new in b.names() and name not in b.names() and name not in a.names()
    assert f"<name>{new}</name>" in dumpxml(b, new)
    assert b.migctl("domuuid", new).stdout.strip() == u
    assert a.journal() == [] and b.journal() == []


@pytest.fixture
def partition_hosts(
    make_network: Callable[[], Network], tmp_path: Path
) -> Iterator[tuple[Network, Host, Host]]:
    """A network of its own (the test cuts it) and two hosts; A's srcd has a short RPC
    deadline."""
    net = make_network()
    try:
        a, b = start_hosts(net, tmp_path, srcd_a=("--rpc-timeout", str(PARTITION_RPC_TIMEOUT)))
    except BaseException:
        net.destroy()
        raise
    try:
        yield net, a, b
    finally:
        a.stop()
        b.stop()
        net.destroy()


@pytest.mark.parametrize("channel", ["cold", "warm"])
def test_partition_fails_cleanly_then_recovers(
    partition_hosts: tuple[Network, Host, Host], domname: str, channel: str
) -> None:
    """B's link goes down: a p2p migration from A fails with a clear error within srcd's RPC
    deadline and changes nothing; once the link is back up, the same migration succeeds.

    "cold": A's srcd never talked to B before the cut; "warm": it did (an established
    connection that silently stops answering)."""
    net, a, b = partition_hosts
    name = domname
    u = define(a, name)
    before = dumpxml(a, name)
    if channel == "warm":
        a.migctl(*OFFLINE, "--p2p", "--undefinesource", name, b.dst)
        b.migctl(*OFFLINE, "--p2p", "--undefinesource", name, a.dst)
        assert name in a.names() and name not in b.names()

    net.link(net.ns_b, up=False)
    try:
        t0 = time.monotonic()
        r = a.migctl(*OFFLINE, "--p2p", "--undefinesource", name, b.dst, check=False, timeout=60)
        elapsed = time.monotonic() - t0
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stdout == ""
        first, _, err = r.stderr.strip().partition("\n")  # virsh's "Failed to migrate" line
        assert first == f"error: Failed to migrate domain '{name}'", r.stderr
        assert err in (
            "error: Timed out during operation: "
            f"destination host '{b.dst}' did not answer before the deadline",
            # the connect itself can fail first (no ARP answer: EHOSTUNREACH)
        ) or (
            err.startswith(f"error: unable to connect to destination host '{b.dst}': ")
            and "\n" not in err
        ), err
        assert elapsed < PARTITION_RPC_TIMEOUT + SLACK, f"took {elapsed:.1f}s: {err}"
        # the source is untouched: still defined, same XML, no job left behind
        assert name in a.names()
        assert dumpxml(a, name) == before
        assert a.migctl("domstate", name).stdout.strip() == "shut off"
        assert a.journal() == []
    finally:
        net.link(net.ns_b, up=True)

    # B never saw the domain
    assert name not in b.names()
    assert b.journal() == []

    # Right after the link returns, the kernel may still hold B's neighbour entry as FAILED
    # for a moment (connects fail with EHOSTUNREACH; srcd retries once on a fresh channel);
    # and on a warm connection the Prepare sent during the cut may arrive late (TCP
    # retransmission) and hold the domain on B until srcd's background Finish(cancelled)
    # drops it. A migration started in that window fails at once, changing nothing.
    failures = migrate_until_ok(a, b, name, within=RECONNECT_GRACE)
    for err in failures:
        assert err.startswith(f"error: unable to connect to destination host '{b.dst}': ") or (
            err == "error: Requested operation is not valid: another migration job is already "
            f"running for domain '{name}'"
        ), err
    assert name in b.names() and name not in a.names()
    assert dumpxml(b, name).strip() == before.strip()
    assert b.migctl("domuuid", name).stdout.strip() == u
    assert a.journal() == [] and b.journal() == []


def migrate_until_ok(a: Host, b: Host, name: str, within: float) -> list[str]:
    """p2p --undefinesource A -> B, retried until it succeeds; the errors of failed tries."""
    failures: list[str] = []
    deadline = time.monotonic() + within
    while True:
        r = a.migctl(*OFFLINE, "--p2p", "--undefinesource", name, b.dst, check=False, timeout=60)
        if r.returncode == 0:
            return failures
        failures.append(r.stderr.strip().splitlines()[-1])  # the cause, after virsh's first line
        # a failed try changed nothing
        assert name in a.names() and name not in b.names(), failures
        if time.monotonic() > deadline:
            raise AssertionError(f"no success {within}s after the link came back: {failures}")
        time.sleep(0.1)
