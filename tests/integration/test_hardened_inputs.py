"""Hardened inputs against real daemons: requests that do not decode, errors that quote huge
input, gRPC message size limits (and their setting), and two requests that must change
nothing: a Prepare whose cookie claims a UUID defined on the destination under another name,
and a Finish for a migration the destination never prepared. Found by, or written with, the
fuzzer (tests/fuzz, scripts/fuzz.py)."""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from pathlib import Path

import grpc
import pytest
from helpers.hosts import Host, sample_domain_xml
from vmmigrate.common import tunnelwire
from vmmigrate.common.cookie import MigrationCookie, format_cookie
from vmmigrate.common.errors import ERROR_CLASS_KEY
from vmmigrate.common.flags import MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

OFFLINE_FLAGS = int(MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST | MigrateFlag.PEER2PEER)
OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", 64 << 20)]


def state(h: Host, outcomes: bool = True) -> dict[str, str]:
    """Every file of the host's state dir but the locks: what a refusal must not change.
    Without ``outcomes``: not the answers dstd keeps for Finish retries, nor the history
    entry of the failed migration either (what a Finish that ran leaves)."""
    out = {}
    for p in sorted(h.state_dir.rglob("*")):
        rel = p.relative_to(h.state_dir)
        if (p.is_file() and rel.parts[0] != "locks" and p.suffix != ".log"
                and (outcomes or rel.parts[0] not in ("outcomes", "history"))):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def raw_call(address: str, method: str, payload: bytes) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(address, options=OPTIONS) as ch:
        f = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            return f(payload, timeout=20)  # type: ignore[no-any-return]
        except grpc.RpcError as err:
            return err


def error_class(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(ERROR_CLASS_KEY)


def cookie_for(name: str, u: str) -> bytes:
    return format_cookie(MigrationCookie(name=name, uuid=u, hostname="elsewhere",
                                         hostuuid=str(uuidlib.uuid4())))


def prepare(stub: pb_grpc.MigrationDestinationServiceStub, mid: str, cookie: bytes,
            xml: str) -> pb.PrepareResponse:
    return stub.Prepare(pb.PrepareRequest(
        header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_FLAGS, cookie=cookie),
        domain_xml=xml), timeout=10)


# ---------------------------------------------------------------------------------------
# Requests that do not decode


@pytest.mark.parametrize(
    ("daemon", "method", "payload"),
    [
        ("dst", "MigrationDestinationService/Prepare", b"\x12\x02\xff\xfe"),  # XML not UTF-8
        ("dst", "MigrationDestinationService/Finish", b"\xff\xff\xff"),
        ("src", "DomainService/Define", b"\x0a\x03caf\xe9"),
        ("src", "DomainService/GetInfo", b"\x0a\x80\x80\x80\x80\x10"),  # length past the end
        ("src", "MigrationSourceService/Begin", b"\x0a" * 200),
    ],
)
def test_undecodable_request_is_invalid_argument(hosts: tuple[Host, Host], daemon: str,
                                                 method: str, payload: bytes) -> None:
    """grpc.aio answered UNKNOWN ("Unexpected DecodeError"), as for a crash."""
    a, _ = hosts
    before = state(a)
    err = raw_call(a.dst if daemon == "dst" else a.src, f"/vmmigrate.v1.{method}", payload)
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(f"malformed request message for {method.split('/')[1]}: ")
    assert error_class(err) == "InvalidArgument"
    assert state(a) == before
    assert a.names() is not None  # still serving


def test_garbage_stream_to_a_tunnelled_migration_fails_cleanly(hosts: tuple[Host, Host],
                                                               domname: str) -> None:
    """The incoming emulator refuses a stream it cannot read and exits. That was once a
    ConnectionResetError out of the tunnel's handler (UNKNOWN). Now either the stream ends
    with what the emulator said (simvm's NAK, carried back as data: on a unix socket a
    writer is not told that the reader left with bytes unread), or with a clean INTERNAL
    error when the emulator's going away is seen; the incoming migration is then cancelled
    and nothing is left."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    mid = f"garbage-{domname}"
    flags = int(MigrateFlag.LIVE | MigrateFlag.PEER2PEER | MigrateFlag.TUNNELLED
                | MigrateFlag.PERSIST_DEST)
    before = state(b, outcomes=False)
    with grpc.insecure_channel(b.dst, options=OPTIONS) as ch:
        stub = pb_grpc.MigrationDestinationServiceStub(ch)
        stub.PrepareTunnel(pb.PrepareRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=flags, cookie=cookie_for(domname, u)),
            domain_xml=sample_domain_xml(domname, u)), timeout=10)
        back = b""
        carry = ch.stream_stream(tunnelwire.METHOD)
        try:
            for msg in carry(iter([b"\xab" * 1_000_000]), timeout=10,
                             metadata=[(tunnelwire.MIGRATION_ID_KEY, mid)]):
                back += tunnelwire.parse_frame(msg)[0] if msg else b""
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INTERNAL, err.details()
            assert (err.details() or "").startswith("incoming emulator closed the tunnel: ")
            assert error_class(err) == "OperationFailed"
        else:
            assert back[:1] == b"\x15", back  # simvm's NAK: u16 length, then the reason
            size = int.from_bytes(back[1:3], "little")
            assert size > 0 and len(back) == 3 + size, back
            assert back[3:].decode().startswith("not a simvm migration stream"), back
        r = stub.Finish(pb.FinishRequest(header=pb.PhaseHeader(migration_id=mid, flags=flags),
                                         dest_name=domname, cancelled=True), timeout=10)
        assert not r.HasField("domain")
    assert state(b, outcomes=False) == before and domname not in b.names()


# ---------------------------------------------------------------------------------------
# Errors that quote huge input


@pytest.mark.parametrize("char", ["x", "\u00e9", "\U0001f600", "%"])
def test_error_quoting_a_huge_name_still_arrives(hosts: tuple[Host, Host], char: str) -> None:
    """The message quotes the name; past gRPC's trailer limit the client got "Stream removed"
    (RESOURCE_EXHAUSTED) instead of the error. It is cut to fit now."""
    a, _ = hosts
    name = char * 70_000
    with grpc.insecure_channel(a.src, options=OPTIONS) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.DomainServiceStub(ch).GetInfo(pb.DomainRequest(domain=name), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    details = err.value.details() or ""
    assert details.startswith(f"Domain not found: no domain with matching name '{char * 100}")
    assert details.endswith(" characters, cut)")
    assert error_class(err.value) == "NoDomain"


# ---------------------------------------------------------------------------------------
# A rename to a name XML cannot carry


def test_dest_name_with_control_character_is_refused(hosts: tuple[Host, Host],
                                                     domname: str) -> None:
    """Was INTERNAL (lxml's ValueError) from the rename in Prepare."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    before = state(b)
    with grpc.insecure_channel(b.dst, options=OPTIONS) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.MigrationDestinationServiceStub(ch).Prepare(pb.PrepareRequest(
            header=pb.PhaseHeader(migration_id=f"ctl-{domname}", flags=OFFLINE_FLAGS,
                                  cookie=cookie_for(domname, u)),
            domain_xml=sample_domain_xml(domname, u),
            params=pb.MigrationParams(dest_name="bad\x08name")), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "name 'bad\\x08name' contains a character XML cannot carry"
    assert state(b) == before


# ---------------------------------------------------------------------------------------
# Finish with the wrong name must not block the right one


def test_finish_with_wrong_name_does_not_block_the_right_finish(hosts: tuple[Host, Host],
                                                                domname: str) -> None:
    """A Finish refused for its name was kept as *the* answer for the migration id: the
    right Finish (or the source's cancel) then got NOT_FOUND and the reservation stayed."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    mid = f"wrong-name-{domname}"
    with grpc.insecure_channel(b.dst, options=OPTIONS) as ch:
        stub = pb_grpc.MigrationDestinationServiceStub(ch)
        prepare(stub, mid, cookie_for(domname, u), sample_domain_xml(domname, u))
        reserved = state(b)
        hdr = pb.PhaseHeader(migration_id=mid, flags=OFFLINE_FLAGS)
        with pytest.raises(grpc.RpcError) as err:
            stub.Finish(pb.FinishRequest(header=hdr, dest_name="someone-else"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no domain with matching name 'someone-else'"
        assert state(b) == reserved  # still reserved, nothing defined
        r = stub.Finish(pb.FinishRequest(header=hdr, dest_name=domname), timeout=10)
    assert r.domain.name == domname and r.domain.uuid == u
    assert domname in b.names() and b.journal() == []
    b.migctl("undefine", domname)


# ---------------------------------------------------------------------------------------
# The two requests that must change nothing


def test_prepare_claiming_a_uuid_defined_under_another_name_changes_nothing(
        hosts: tuple[Host, Host], domname: str) -> None:
    _, b = hosts
    u = str(uuidlib.uuid4())
    other = f"{domname}-existing"
    b.define(sample_domain_xml(other, u), f"{other}.xml")
    before, names = state(b), b.names()
    existing_xml = b.migctl("dumpxml", other).stdout
    with grpc.insecure_channel(b.dst, options=OPTIONS) as ch:
        stub = pb_grpc.MigrationDestinationServiceStub(ch)
        # cookie and XML agree on (domname, u); u is defined here as `other`
        with pytest.raises(grpc.RpcError) as err:
            prepare(stub, f"claim-{domname}", cookie_for(domname, u), sample_domain_xml(domname, u))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert err.value.details() == f"domain '{other}' is already defined with uuid {u}"
        # the cookie claims u, the XML says another UUID: refused before anything is looked at
        v = str(uuidlib.uuid4())
        with pytest.raises(grpc.RpcError) as err:
            prepare(stub, f"claim2-{domname}", cookie_for(domname, u), sample_domain_xml(domname, v))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == f"Incoming cookie data had unexpected UUID {u} vs {v}"
        # and the same with a dname: the rename does not get around the UUID check
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareRequest(
                header=pb.PhaseHeader(migration_id=f"claim3-{domname}", flags=OFFLINE_FLAGS,
                                      cookie=cookie_for(domname, u)),
                domain_xml=sample_domain_xml(domname, u),
                params=pb.MigrationParams(dest_name=f"{domname}-renamed")), timeout=10)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert state(b) == before and b.names() == names and b.journal() == []
    assert b.migctl("dumpxml", other).stdout == existing_xml
    # nothing was reserved: the migration ids are not in use, the name is free
    with grpc.insecure_channel(b.dst, options=OPTIONS) as ch:
        stub = pb_grpc.MigrationDestinationServiceStub(ch)
        w = str(uuidlib.uuid4())
        prepare(stub, f"claim-{domname}", cookie_for(domname, w), sample_domain_xml(domname, w))
        stub.Finish(pb.FinishRequest(header=pb.PhaseHeader(migration_id=f"claim-{domname}",
                                                           flags=OFFLINE_FLAGS),
                                     dest_name=domname, cancelled=True), timeout=10)
    b.migctl("undefine", other)


def test_finish_for_a_never_prepared_migration_changes_nothing(hosts: tuple[Host, Host],
                                                               domname: str) -> None:
    """Not cancelled: refused, and not even remembered (unlike a blind cancel, which leaves
    a tombstone): a Prepare with that id afterwards works."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    b.define(sample_domain_xml(domname, u), f"{domname}.xml")  # a domain of that name exists
    before, names = state(b), b.names()
    xml = b.migctl("dumpxml", domname).stdout
    mid = f"never-{domname}"
    with grpc.insecure_channel(b.dst, options=OPTIONS) as ch:
        stub = pb_grpc.MigrationDestinationServiceStub(ch)
        for cookie in (b"", cookie_for(domname, u)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Finish(pb.FinishRequest(
                    header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_FLAGS, cookie=cookie),
                    dest_name=domname), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == f"domain '{domname}' is not processing incoming migration"
        assert state(b) == before and b.names() == names and b.journal() == []
        assert b.migctl("dumpxml", domname).stdout == xml
        b.migctl("undefine", domname)
        prepare(stub, mid, cookie_for(domname, u), sample_domain_xml(domname, u))
        stub.Finish(pb.FinishRequest(header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_FLAGS),
                                     dest_name=domname, cancelled=True), timeout=10)
    assert b.journal() == []


# ---------------------------------------------------------------------------------------
# gRPC message size limits


@pytest.mark.parametrize("daemon", ["srcd", "dstd"])
def test_message_over_the_limit_is_refused_and_the_daemon_serves_on(
        hosts: tuple[Host, Host], daemon: str) -> None:
    a, _ = hosts
    addr, method = ((a.src, "/vmmigrate.v1.DomainService/Define") if daemon == "srcd"
                    else (a.dst, "/vmmigrate.v1.MigrationDestinationService/Prepare"))
    before = state(a)
    big = pb.DefineRequest(xml="x" * (16 * 1024 * 1024 + 1)).SerializeToString()
    err = raw_call(addr, method, big)
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in (err.details() or "")
    assert state(a) == before
    caps = raw_call(a.dst, "/vmmigrate.v1.MigrationDestinationService/GetCapabilities", b"")
    assert isinstance(caps, bytes) and pb.CapabilitiesResponse.FromString(caps).protocol_version == 3
    assert isinstance(raw_call(a.src, "/vmmigrate.v1.DomainService/List", b""), bytes)


def test_message_limit_is_configurable(tmp_path: Path) -> None:
    """max_message_bytes in the config file, for both daemons: a request just over it is
    refused, one just under it reaches the handler."""
    conf = tmp_path / "small.toml"
    conf.write_text("max_message_bytes = 65536\n")
    h = Host("S", "127.0.0.8", tmp_path / "S").start(
        srcd_args=["--config", str(conf)], dstd_args=["--config", str(conf)])
    try:
        for addr, method in ((h.src, "/vmmigrate.v1.DomainService/Define"),
                             (h.dst, "/vmmigrate.v1.MigrationDestinationService/Prepare")):
            over = raw_call(addr, method, b"\x12\x81\x80\x04" + b"x" * 65537)
            assert isinstance(over, grpc.RpcError)
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(65541 vs. 65536)" in (over.details() or "")
            under = raw_call(addr, method, b"\x12\xf0\xff\x03" + b"x" * 65520)
            assert isinstance(under, grpc.RpcError)
            assert under.code() == grpc.StatusCode.INVALID_ARGUMENT  # the handler's refusal
    finally:
        h.stop()
