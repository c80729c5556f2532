"""Offline migration end to end: real srcd and dstd processes for two hosts on 127.0.0.2 and
127.0.0.3, driven through migctl (p2p and client-driven)."""

from __future__ import annotations

import uuid as uuidlib

import pytest
from helpers.hosts import Host, sample_domain_xml
from vmmigrate.common.domainxml import canonical

OFFLINE = ("migrate", "--offline", "--persistent")


def dumpxml(h: Host, name: str) -> str:
    return h.migctl("dumpxml", name).stdout


@pytest.fixture
def domain(hosts: tuple[Host, Host], domname: str) -> tuple[str, str]:
    """A domain defined on host A; returns (name, uuid)."""
    a, _ = hosts
    u = str(uuidlib.uuid4())
    a.define(sample_domain_xml(domname, u), f"{domname}.xml")
    return domname, u


@pytest.mark.parametrize("mode", ["p2p", "managed"])
@pytest.mark.parametrize("undefine", [False, True])
def test_offline_migration(hosts: tuple[Host, Host], domain: tuple[str, str], mode: str,
                           undefine: bool) -> None:
    a, b = hosts
    name, u = domain
    before = dumpxml(a, name)
    args = [*OFFLINE, *(["--p2p"] if mode == "p2p" else []),
            *(["--undefinesource"] if undefine else []), name, b.dst]
    r = a.migctl(*args)
    assert r.stdout == ""
    assert name in b.names()
    assert (name in a.names()) is (not undefine)
    after = dumpxml(b, name)
    assert canonical(after) == canonical(before)
    assert after.strip() == before.strip()  # kept verbatim, comments included
    assert b.migctl("domstate", name).stdout.strip() == "shut off"
    info = b.migctl("dominfo", name).stdout
    assert f"UUID:           {u}" in info
    assert "Persistent:     yes" in info
    assert a.journal() == [] and b.journal() == []
    # and back again, the other way round, to the first host
    back = [*OFFLINE, *(["--p2p"] if mode == "managed" else []), "--undefinesource", name, a.dst]
    b.migctl(*back)
    assert name in a.names() and name not in b.names()
    assert dumpxml(a, name).strip() == before.strip()


def test_p2p_reports_phase_order(hosts: tuple[Host, Host], domain: tuple[str, str]) -> None:
    a, b = hosts
    name, _ = domain
    mid = f"phase-order-{uuidlib.uuid4()}"
    a.migctl(*OFFLINE, "--p2p", "--migration-id", mid, name, b.dst)
    assert a.srcd is not None and b.dstd is not None
    src = [(e["old"], e["new"]) for e in a.srcd.events()
           if e.get("event") == "phase_advanced" and e.get("migration_id") == mid]
    dst = [(e["old"], e["new"]) for e in b.dstd.events()
           if e.get("event") == "phase_advanced" and e.get("migration_id") == mid]
    assert src == [("begin3", "confirm3")]
    assert dst == [("prepare", "finish3")]
    # Prepare ran on the destination before Finish, and Confirm after Finish
    rpcs = [e["rpc"] for e in b.dstd.events() if e.get("migration_id") == mid and "rpc" in e]
    assert rpcs.index("Prepare") < rpcs.index("Finish")


@pytest.mark.parametrize("mode", ["p2p", "managed"])
def test_dname_renames_on_destination(hosts: tuple[Host, Host], domain: tuple[str, str],
                                      mode: str) -> None:
    a, b = hosts
    name, u = domain
    new = f"{name}-renamed"
    a.migctl(*OFFLINE, *(["--p2p"] if mode == "p2p" else []), "--undefinesource",
             "--dname", new, name, b.dst)
    assert new in b.names() and name not in b.names() and name not in a.names()
    assert f"<name>{new}</name>" in dumpxml(b, new)
    assert b.migctl("domuuid", new).stdout.strip() == u


@pytest.mark.parametrize("mode", ["p2p", "managed"])
def test_xml_replaces_definition_sent(hosts: tuple[Host, Host], domain: tuple[str, str],
                                      mode: str) -> None:
    a, b = hosts
    name, u = domain
    xml = sample_domain_xml(name, u, memory_mib=128).replace("test domain", "replaced domain")
    path = a.workdir / f"{name}-dest.xml"
    path.write_text(xml)
    a.migctl(*OFFLINE, *(["--p2p"] if mode == "p2p" else []), "--xml", str(path), name, b.dst)
    got = dumpxml(b, name)
    assert "replaced domain" in got and "<memory unit='MiB'>128</memory>" in got
    assert "test domain" in dumpxml(a, name)  # the source keeps its own


def test_xml_with_other_uuid_is_refused(hosts: tuple[Host, Host], domain: tuple[str, str]) -> None:
    a, b = hosts
    name, u = domain
    other = str(uuidlib.uuid4())
    path = a.workdir / f"{name}-bad.xml"
    path.write_text(sample_domain_xml(name, other))
    r = a.migctl(*OFFLINE, "--p2p", "--xml", str(path), name, b.dst, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == f"error: Failed to migrate domain '{name}'"
    assert r.stderr.strip().endswith(f"Target domain uuid {other} does not match source {u}")
    assert name not in b.names() and name in a.names()


@pytest.mark.parametrize("mode", ["p2p", "managed"])
def test_persistent_xml_is_honoured(hosts: tuple[Host, Host], domain: tuple[str, str],
                                    mode: str) -> None:
    a, b = hosts
    name, u = domain
    path = a.workdir / f"{name}-persist.xml"
    path.write_text(sample_domain_xml(name, u).replace("test domain", "persistent definition"))
    a.migctl(*OFFLINE, *(["--p2p"] if mode == "p2p" else []), "--persistent-xml", str(path),
             "--dname", f"{name}-p", name, b.dst)
    got = dumpxml(b, f"{name}-p")
    assert "persistent definition" in got and f"<name>{name}-p</name>" in got


def test_undefinesource_after_destination_refusal_keeps_source(
    hosts: tuple[Host, Host], domain: tuple[str, str]
) -> None:
    """Same name, other UUID on the destination: Prepare refuses, the source is untouched."""
    a, b = hosts
    name, _ = domain
    other = str(uuidlib.uuid4())
    b.define(sample_domain_xml(name, other), f"{name}-b.xml")
    for mode in (["--p2p"], []):
        r = a.migctl(*OFFLINE, *mode, "--undefinesource", name, b.dst, check=False)
        assert r.returncode == 1
        assert r.stderr.splitlines()[-1] == (
            f"error: operation failed: domain '{name}' already exists with uuid {other}")
        assert name in a.names()
        assert b.migctl("domuuid", name).stdout.strip() == other
    assert a.journal() == [] and b.journal() == []


def test_same_uuid_other_name_on_destination(hosts: tuple[Host, Host],
                                             domain: tuple[str, str]) -> None:
    a, b = hosts
    name, u = domain
    b.define(sample_domain_xml(f"{name}-other", u), f"{name}-other.xml")
    r = a.migctl(*OFFLINE, "--p2p", name, b.dst, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        f"error: operation failed: domain '{name}-other' is already defined with uuid {u}")


def test_same_name_and_uuid_inactive_is_replaced(hosts: tuple[Host, Host],
                                                 domain: tuple[str, str]) -> None:
    """libvirt accepts an existing inactive definition with the same name and UUID."""
    a, b = hosts
    name, u = domain
    b.define(sample_domain_xml(name, u, memory_mib=32), f"{name}-old.xml")
    a.migctl(*OFFLINE, "--p2p", name, b.dst)
    assert "<memory unit='MiB'>64</memory>" in dumpxml(b, name)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--offline", "--p2p"],
         "offline migration must be specified with the persistent flag set"),
        (["--offline", "--persistent", "--p2p", "--copy-storage-all"],
         "offline migration cannot handle non-shared storage"),
        (["--offline", "--persistent", "--copy-storage-inc"],
         "offline migration cannot handle non-shared storage"),
        (["--offline", "--persistent", "--p2p", "--tunnelled"],
         "tunnelled offline migration does not make sense"),
        (["--offline", "--persistent", "--tunnelled"],
         "cannot perform tunnelled migration without using peer2peer flag"),
        (["--live", "--p2p", "--persistent"], "domain is not running"),
        (["--live", "--persistent"], "domain is not running"),
        (["--offline", "--persistent", "--timeout", "5"],
         "migrate: Unexpected timeout for offline migration"),
        (["--offline", "--persistent", "--timeout-suspend"],
         "migrate: Unexpected --timeout-* option without --timeout"),
    ],
)
def test_validation_errors_change_nothing(hosts: tuple[Host, Host], domain: tuple[str, str],
                                          args: list[str], message: str) -> None:
    a, b = hosts
    name, _ = domain
    before_a, before_b = a.names(), b.names()
    r = a.migctl("migrate", *args, "--undefinesource", name, b.dst, check=False)
    assert r.returncode == 1
    last = r.stderr.splitlines()[-1]  # after virsh's "Failed to migrate" line, if any
    assert last.startswith("error: ") and last.endswith(message), r.stderr
    assert a.names() == before_a and b.names() == before_b
    assert a.journal() == [] and b.journal() == []
    # the domain's job was released: the same migration, done right, now works
    a.migctl(*OFFLINE, "--p2p", name, b.dst)


@pytest.mark.parametrize("mode", ["p2p", "managed"])
def test_migrating_to_own_host_is_refused(hosts: tuple[Host, Host], domain: tuple[str, str],
                                          mode: str) -> None:
    a, _ = hosts
    name, _ = domain
    r = a.migctl(*OFFLINE, *(["--p2p"] if mode == "p2p" else []), "--undefinesource", name,
                 a.dst, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith(
        "error: internal error: Attempt to migrate guest to the same host ")
    assert a.names().count(name) == 1
    assert a.journal() == []


def test_unknown_domain(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    r = a.migctl(*OFFLINE, "--p2p", "no-such-domain", b.dst, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "error: failed to get domain 'no-such-domain'",
        "error: Domain not found: no domain with matching name 'no-such-domain'",
    ]
