"""Every bad input gets a clear error and changes nothing (real daemons, migctl and raw RPCs)."""

from __future__ import annotations

import socket
import uuid as uuidlib

import grpc
import pytest
from helpers.hosts import Host, sample_domain_xml
from vmmigrate.common.cookie import CookieFlag, MigrationCookie, format_cookie
from vmmigrate.common.flags import MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

OFFLINE_FLAGS = int(MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST | MigrateFlag.PEER2PEER)

BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain type='kvm'><name>&lol3;</name></domain>"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain type='kvm'><name>xxe</name><description>&xxe;</description></domain>"""


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain type='kvm'><name>x</name>", "malformed domain XML: "),
        ("<network><name>x</name></network>", "unexpected root element <network>, expecting <domain>"),
        ("<domain type='kvm'><memory>1</memory></domain>", "missing name information"),
        ("<domain type='kvm'><name>a/b</name></domain>", "name a/b cannot contain '/'"),
        ("<domain type='kvm'><name>.</name></domain>", "domain name '.' is not allowed"),
        ("<domain type='kvm'><name>..</name></domain>", "domain name '..' is not allowed"),
        ("<domain type='kvm'><name>u</name><uuid>not-a-uuid</uuid></domain>", "malformed uuid element"),
        (XXE, "domain XML must not contain a DTD or entity declarations"),
        (BOMB, "domain XML must not contain a DTD or entity declarations"),
        ("<domain type='kvm'><name>big</name><description>" + "x" * (5 * 1024 * 1024)
         + "</description></domain>", "domain XML is too large: "),
        ("<domain type='kvm'><name>deep</name>" + "<a>" * 200 + "</a>" * 200 + "</domain>",
         "domain XML nests too deeply"),
        ("", "domain XML is empty"),
    ],
    ids=["malformed", "not-domain", "no-name", "slash", "dot", "dotdot", "bad-uuid", "xxe",
         "bomb", "oversize", "deep", "empty"],
)
def test_define_refuses_bad_xml(hosts: tuple[Host, Host], xml: str, message: str) -> None:
    a, _ = hosts
    before = a.names()
    files_before = a.domain_files()
    path = a.workdir / "bad.xml"
    path.write_text(xml)
    r = a.migctl("define", str(path), check=False)
    assert r.returncode == 1
    first, second = r.stderr.splitlines()
    assert first == f"error: Failed to define domain from {path}", r.stderr
    assert second.startswith("error: ") and message in second, r.stderr
    assert a.names() == before
    assert a.domain_files() == files_before


def test_define_non_utf8(hosts: tuple[Host, Host]) -> None:
    a, _ = hosts
    path = a.workdir / "latin1.xml"
    path.write_bytes("<domain type='kvm'><name>caf\u00e9</name></domain>".encode("latin-1"))
    r = a.migctl("define", str(path), check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: Failed to open file")


def test_define_generates_uuid_and_refuses_conflicts(hosts: tuple[Host, Host], domname: str) -> None:
    a, _ = hosts
    out = a.define(sample_domain_xml(domname), f"{domname}.xml")
    assert out.strip().startswith(f"Domain '{domname}' defined from ")
    u = a.migctl("domuuid", domname).stdout.strip()
    assert str(uuidlib.UUID(u)) == u
    assert f"<uuid>{u}</uuid>" in a.migctl("dumpxml", domname).stdout
    other = str(uuidlib.uuid4())
    path = a.workdir / "conflict.xml"
    path.write_text(sample_domain_xml(domname, other))
    r = a.migctl("define", str(path), check=False)
    assert r.stderr.splitlines() == [
        f"error: Failed to define domain from {path}",
        f"error: operation failed: domain '{domname}' already exists with uuid {u}",
    ]
    path.write_text(sample_domain_xml(domname + "-x", u))
    r = a.migctl("define", str(path), check=False)
    assert r.stderr.splitlines()[1] == (
        f"error: operation failed: domain '{domname}' is already defined with uuid {u}")
    # the same name and UUID: an update, as libvirt
    path.write_text(sample_domain_xml(domname, u, memory_mib=96))
    a.migctl("define", str(path))
    assert "<memory unit='MiB'>96</memory>" in a.migctl("dumpxml", domname).stdout
    a.migctl("undefine", domname)
    assert domname not in a.names()


def _dest_stub(h: Host) -> tuple[grpc.Channel, pb_grpc.MigrationDestinationServiceStub]:
    ch = grpc.insecure_channel(h.dst, options=[("grpc.enable_http_proxy", 0)])
    return ch, pb_grpc.MigrationDestinationServiceStub(ch)


def _prepare(stub: pb_grpc.MigrationDestinationServiceStub, cookie: bytes, xml: str,
             flags: int = OFFLINE_FLAGS, mid: str | None = None) -> pb.PrepareResponse:
    return stub.Prepare(
        pb.PrepareRequest(
            header=pb.PhaseHeader(migration_id=mid or str(uuidlib.uuid4()), flags=flags,
                                  cookie=cookie),
            domain_xml=xml,
        ),
        timeout=10,
    )


def _cookie(name: str, u: str, features: CookieFlag = CookieFlag.LOCKSTATE) -> bytes:
    return format_cookie(MigrationCookie(name=name, uuid=u, hostname="elsewhere",
                                         hostuuid=str(uuidlib.uuid4()), features=features))


@pytest.mark.parametrize(
    ("cookie", "message"),
    [
        (b"<qemu-migration><name>x", "malformed migration cookie"),
        (b"<qemu-migration><uuid>u</uuid></qemu-migration>", "missing name element in migration data"),
        (b"not xml at all", "malformed migration cookie"),
        (None, "Unknown migration cookie feature frobnicate"),
        (b"<!DOCTYPE q [<!ENTITY a 'b'>]><qemu-migration/>",
         "migration cookie must not contain a DTD or entity declarations"),
    ],
    ids=["truncated", "no-name", "garbage", "unknown-feature", "dtd"],
)
def test_prepare_refuses_bad_cookie(hosts: tuple[Host, Host], domname: str,
                                    cookie: bytes | None, message: str) -> None:
    _, b = hosts
    u = str(uuidlib.uuid4())
    if cookie is None:
        cookie = _cookie(domname, u).replace(
            b"<feature name='lockstate'/>", b"<feature name='frobnicate'/>")
    ch, stub = _dest_stub(b)
    with ch, pytest.raises(grpc.RpcError) as err:
        _prepare(stub, cookie, sample_domain_xml(domname, u))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(message), err.value.details()
    assert b.journal() == [] and domname not in b.names()


def test_prepare_refuses_unknown_flags_and_mismatched_cookie(hosts: tuple[Host, Host],
                                                             domname: str) -> None:
    _, b = hosts
    u = str(uuidlib.uuid4())
    ch, stub = _dest_stub(b)
    with ch:
        with pytest.raises(grpc.RpcError) as err:
            _prepare(stub, _cookie(domname, u), sample_domain_xml(domname, u),
                     flags=OFFLINE_FLAGS | (1 << 40))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "unsupported flags (0x10000000000) in function prepare"
        other = str(uuidlib.uuid4())
        with pytest.raises(grpc.RpcError) as err:
            _prepare(stub, _cookie(domname, other), sample_domain_xml(domname, u))
        assert err.value.details() == f"Incoming cookie data had unexpected UUID {other} vs {u}"
        with pytest.raises(grpc.RpcError) as err:
            _prepare(stub, _cookie(domname, u),
                     sample_domain_xml(domname, u),
                     flags=int(MigrateFlag.OFFLINE | MigrateFlag.PEER2PEER))
        assert err.value.details() == "offline migration must be specified with the persistent flag set"
        with pytest.raises(grpc.RpcError) as err:
            _prepare(stub, _cookie(domname, u), sample_domain_xml(domname, u),
                     flags=OFFLINE_FLAGS | int(MigrateFlag.TUNNELLED))
        assert err.value.details() == "tunnelled offline migration does not make sense"
        with pytest.raises(grpc.RpcError) as err:
            _prepare(stub, _cookie(domname, u), sample_domain_xml(domname, u),
                     flags=OFFLINE_FLAGS | int(MigrateFlag.NON_SHARED_DISK))
        assert err.value.details() == "offline migration cannot handle non-shared storage"
    assert b.journal() == [] and domname not in b.names()


def test_finish_for_unknown_migration_changes_nothing(hosts: tuple[Host, Host],
                                                      domname: str) -> None:
    _, b = hosts
    ch, stub = _dest_stub(b)
    with ch, pytest.raises(grpc.RpcError) as err:
        stub.Finish(pb.FinishRequest(
            header=pb.PhaseHeader(migration_id="never-prepared", flags=OFFLINE_FLAGS),
            dest_name=domname), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == f"domain '{domname}' is not processing incoming migration"
    assert domname not in b.names()


def test_migrate_rpc_refuses_unknown_flags(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    with grpc.insecure_channel(a.src, options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = pb_grpc.DomainServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Migrate(pb.MigrateRequest(domain=domname, dest_uri=b.dst,
                                           flags=OFFLINE_FLAGS | (1 << 25)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "unsupported flags (0x2000000) in function migrate"
    assert domname in a.names() and domname not in b.names()


def test_unreachable_destination_leaves_source_untouched(hosts: tuple[Host, Host],
                                                         domname: str) -> None:
    a, _ = hosts
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    # a port nobody listens on: refused at once
    with socket.socket() as s:
        s.bind(("127.0.0.4", 0))
        port = s.getsockname()[1]
    for mode in (["--p2p"], []):
        r = a.migctl("migrate", "--offline", "--persistent", "--undefinesource", *mode,
                     domname, f"127.0.0.4:{port}", check=False)
        assert r.returncode == 1
        first, second = r.stderr.splitlines()[:2]
        assert first == f"error: Failed to migrate domain '{domname}'"
        assert second.startswith(f"error: unable to connect to destination host '127.0.0.4:{port}'")
        assert domname in a.names() and a.journal() == []


def test_silent_destination_hits_the_deadline(tmp_path_factory: pytest.TempPathFactory,
                                              domname: str) -> None:
    """A destination that accepts TCP but never answers: the deadline ends it cleanly."""
    a = Host("A", "127.0.0.2", tmp_path_factory.mktemp("deadline"))
    a.start(srcd_args=["--rpc-timeout", "1.5"])
    try:
        a.define(sample_domain_xml(domname), f"{domname}.xml")
        with socket.socket() as silent:
            silent.bind(("127.0.0.5", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
            r = a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource",
                         domname, f"127.0.0.5:{port}", check=False)
        assert r.returncode == 1
        assert r.stderr.splitlines() == [
            f"error: Failed to migrate domain '{domname}'",
            "error: Timed out during operation: "
            f"destination host '127.0.0.5:{port}' did not answer before the deadline",
        ]
        assert domname in a.names() and a.journal() == []
    finally:
        a.stop()


def test_cancel_before_prepare_refuses_a_late_prepare(hosts: tuple[Host, Host],
                                                      domname: str) -> None:
    """A source that lost track of its Prepare cancels it blindly; a Prepare delivered
    after that (a retransmission after a partition) must not reserve anything."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    mid = f"late-{domname}"
    ch, stub = _dest_stub(b)
    with ch:
        r = stub.Finish(pb.FinishRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_FLAGS),
            dest_name=domname, cancelled=True), timeout=10)
        assert not r.HasField("domain")
        with pytest.raises(grpc.RpcError) as err:
            _prepare(stub, _cookie(domname, u), sample_domain_xml(domname, u), mid=mid)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == f"migration '{mid}' has already ended"
    assert b.journal() == [] and domname not in b.names()


@pytest.mark.parametrize("dname", [" ", "\t", "a/b", ".."])
def test_migrate_with_a_bad_dname_changes_nothing_on_either_host(
        hosts: tuple[Host, Host], domname: str, dname: str) -> None:
    """A --dname the destination cannot take is refused, and no host keeps a trace of it
    (found by the RPC fuzzer: a blank name left a Finish answer behind on the destination)."""
    a, b = hosts
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    outcomes = sorted(p.name for p in (b.state_dir / "outcomes").glob("*")) \
        if (b.state_dir / "outcomes").exists() else []
    with grpc.insecure_channel(a.src, options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = pb_grpc.DomainServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Migrate(pb.MigrateRequest(domain=domname, dest_uri=b.dst, flags=OFFLINE_FLAGS,
                                           params=pb.MigrationParams(dest_name=dname)),
                         timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert domname in a.names() and domname not in b.names()
    after = sorted(p.name for p in (b.state_dir / "outcomes").glob("*")) \
        if (b.state_dir / "outcomes").exists() else []
    assert after == outcomes
    assert not list((b.state_dir / "jobs").glob("*")) if (b.state_dir / "jobs").exists() else True


@pytest.mark.parametrize("uri", [
    "exec:touch {marker}",          # QEMU runs it with /bin/sh as the emulator's user
    "file:{marker}",                # QEMU writes the guest's memory there
    "unix:{marker}",                # any socket on the source host
    "fd:3",
    "tcp:no host:1",
])
def test_client_driven_perform_refuses_a_migration_uri_prepare_never_gives(
        hosts: tuple[Host, Host], domname: str, uri: str, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A client-driven Perform takes its URI from the client: only tcp:HOST:PORT (what a
    Prepare answers) may reach the emulator's migrate; the domain keeps running, untouched."""
    a, _ = hosts
    marker = tmp_path_factory.mktemp("uri") / "written-by-the-emulator"
    uri = uri.format(marker=marker)
    u = str(uuidlib.uuid4())
    a.define(sample_domain_xml(domname, u), f"{domname}.xml")
    a.migctl("start", domname)
    flags = int(MigrateFlag.LIVE | MigrateFlag.PERSIST_DEST | MigrateFlag.CHANGE_PROTECTION)
    mid = f"uri-{uuidlib.uuid4()}"
    with grpc.insecure_channel(a.src) as ch:
        src = pb_grpc.MigrationSourceServiceStub(ch)
        src.Begin(pb.BeginRequest(header=pb.PhaseHeader(migration_id=mid, flags=flags),
                                  domain=domname), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            src.Perform(pb.PerformRequest(header=pb.PhaseHeader(migration_id=mid, flags=flags),
                                          domain=domname,
                                          params=pb.MigrationParams(migrate_uri=uri)), timeout=10)
        assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.INVALID_ARGUMENT)
        assert "migration URI" in (err.value.details() or "")
        src.Confirm(pb.ConfirmRequest(header=pb.PhaseHeader(migration_id=mid, flags=flags),
                                      domain=domname, cancelled=True), timeout=10)
    assert not marker.exists()
    assert a.migctl("domstate", domname).stdout.strip() == "running"
    assert a.journal() == []
