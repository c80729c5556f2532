"""dstd's PrepareFinish (an offline migration's Prepare and Finish in one call), against a
real dstd: what it answers, what it refuses (changing nothing), and how a source that lost
its answer settles it (Finish(cancelled) by migration id)."""

from __future__ import annotations

import uuid as uuidlib

import grpc
import pytest
from helpers.hosts import Host, sample_domain_xml
from vmmigrate.common.cookie import CookieFlag, MigrationCookie, format_cookie
from vmmigrate.common.flags import MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

OFFLINE_FLAGS = int(MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST | MigrateFlag.PEER2PEER)


def _stub(h: Host) -> tuple[grpc.Channel, pb_grpc.MigrationDestinationServiceStub]:
    ch = grpc.insecure_channel(h.dst, options=[("grpc.enable_http_proxy", 0)])
    return ch, pb_grpc.MigrationDestinationServiceStub(ch)


def _request(name: str, u: str, mid: str, *, flags: int = OFFLINE_FLAGS,
             finish_mid: str | None = None, cancelled: bool = False,
             dest_name: str | None = None) -> pb.PrepareFinishRequest:
    cookie = format_cookie(MigrationCookie(name=name, uuid=u, hostname="elsewhere",
                                           hostuuid=str(uuidlib.uuid4()),
                                           features=CookieFlag.LOCKSTATE))
    return pb.PrepareFinishRequest(
        prepare=pb.PrepareRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=flags, cookie=cookie),
            domain_xml=sample_domain_xml(name, u),
        ),
        finish=pb.FinishRequest(
            header=pb.PhaseHeader(migration_id=finish_mid or mid, flags=flags),
            dest_name=dest_name or name,
            cancelled=cancelled,
        ),
    )


def test_prepare_finish_defines_and_a_cancel_gets_its_answer(hosts: tuple[Host, Host],
                                                             domname: str) -> None:
    """Both phases run; Finish(cancelled) afterwards (a source that lost the answer)
    gets the domain, not a cancel; the same call again is refused, changing nothing."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    mid = f"one-call-{domname}"
    ch, stub = _stub(b)
    with ch:
        r = stub.PrepareFinish(_request(domname, u, mid), timeout=10)
        assert r.HasField("finish") and r.finish.domain.name == domname
        assert r.finish.domain.uuid == u and r.finish.domain.id == -1
        assert r.prepare.uri == "" and r.prepare.cookie
        assert domname in b.names() and b.journal() == []
        settled = stub.Finish(pb.FinishRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_FLAGS),
            dest_name=domname, cancelled=True), timeout=10)
        assert settled.domain.name == domname and settled.domain.uuid == u
        with pytest.raises(grpc.RpcError) as err:
            stub.PrepareFinish(_request(domname, u, mid), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == f"migration '{mid}' has already ended"
    assert domname in b.names() and b.journal() == []
    b.migctl("undefine", domname)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"finish_mid": "another"}, "PrepareFinish: Prepare and Finish name different migrations"),
        ({"flags": int(MigrateFlag.LIVE | MigrateFlag.PEER2PEER)},
         "PrepareFinish is for offline migrations only"),
        ({"cancelled": True}, "PrepareFinish with a cancelled Finish"),
    ],
    ids=["two-ids", "live", "cancelled"],
)
def test_prepare_finish_refusals_change_nothing(hosts: tuple[Host, Host], domname: str,
                                                change: dict[str, object], message: str) -> None:
    _, b = hosts
    u = str(uuidlib.uuid4())
    ch, stub = _stub(b)
    with ch, pytest.raises(grpc.RpcError) as err:
        stub.PrepareFinish(_request(domname, u, f"bad-{domname}", **change), timeout=10)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == message
    assert b.journal() == [] and domname not in b.names()


def test_prepare_failure_is_the_calls_status(hosts: tuple[Host, Host], domname: str) -> None:
    """Prepare refused (the persistent flag missing): the call ends with Prepare's status,
    Finish never runs, nothing is reserved."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    ch, stub = _stub(b)
    flags = int(MigrateFlag.OFFLINE | MigrateFlag.PEER2PEER)
    with ch, pytest.raises(grpc.RpcError) as err:
        stub.PrepareFinish(_request(domname, u, f"np-{domname}", flags=flags), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "offline migration must be specified with the persistent flag set"
    assert b.journal() == [] and domname not in b.names()


def test_finish_failure_is_carried_in_the_answer(hosts: tuple[Host, Host], domname: str) -> None:
    """Finish refused (another name than Prepare's): Prepare's answer, and Finish's status
    as the single Finish would have ended; the source's cancel then lets go."""
    _, b = hosts
    u = str(uuidlib.uuid4())
    mid = f"ff-{domname}"
    ch, stub = _stub(b)
    with ch:
        r = stub.PrepareFinish(_request(domname, u, mid, dest_name="other-name"), timeout=10)
        assert r.HasField("finish_error") and r.prepare.cookie
        assert r.finish_error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert r.finish_error.message == "no domain with matching name 'other-name'"
        assert r.finish_error.error_class == "NoDomain"
        assert len(b.journal()) == 1  # still reserved
        cancel = stub.Finish(pb.FinishRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_FLAGS),
            dest_name=domname, cancelled=True), timeout=10)
        assert not cancel.HasField("domain")
    assert b.journal() == [] and domname not in b.names()
