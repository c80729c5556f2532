"""The source checks the destination's capabilities first: a real in-process gRPC server
plays a destination that lacks a feature, and the real srcd must refuse before Begin."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from helpers.hosts import Host, sample_domain_xml

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc


class LimitedDestination(pb_grpc.MigrationDestinationServiceServicer):
    def __init__(self, caps: pb.CapabilitiesResponse) -> None:
        self.caps = caps
        self.prepares = 0

    def GetCapabilities(self, request: pb.CapabilitiesRequest, context: grpc.ServicerContext) -> pb.CapabilitiesResponse:
        return self.caps

    def Prepare(self, request: pb.PrepareRequest, context: grpc.ServicerContext) -> pb.PrepareResponse:
        self.prepares += 1
        context.abort(grpc.StatusCode.INTERNAL, "Prepare must not be reached")
        raise AssertionError


@pytest.fixture
def fake_dest(request: pytest.FixtureRequest) -> Iterator[tuple[str, LimitedDestination]]:
    servicer = LimitedDestination(request.param)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_MigrationDestinationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.6:0")
    server.start()
    yield f"127.0.0.6:{port}", servicer
    server.stop(grace=None)


NO_OFFLINE = pb.CapabilitiesResponse(protocol_version=3, offline=False, params=True)
OLD_PROTOCOL = pb.CapabilitiesResponse(protocol_version=2, offline=True)


@pytest.mark.parametrize("fake_dest", [NO_OFFLINE], indirect=True)
@pytest.mark.parametrize("mode", [["--p2p"], []])
def test_destination_without_offline_support(hosts: tuple[Host, Host], domname: str,
                                             fake_dest: tuple[str, LimitedDestination],
                                             mode: list[str]) -> None:
    a, _ = hosts
    address, servicer = fake_dest
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    r = a.migctl("migrate", "--offline", "--persistent", "--undefinesource", *mode, domname,
                 address, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: Failed to migrate domain '{domname}'",
        "error: argument unsupported: offline migration is not supported by the destination host",
    ]
    assert servicer.prepares == 0
    assert domname in a.names() and a.journal() == []


@pytest.mark.parametrize("fake_dest", [OLD_PROTOCOL], indirect=True)
def test_destination_with_old_protocol(hosts: tuple[Host, Host], domname: str,
                                       fake_dest: tuple[str, LimitedDestination]) -> None:
    a, _ = hosts
    address, servicer = fake_dest
    a.define(sample_domain_xml(domname), f"{domname}.xml")
    r = a.migctl("migrate", "--offline", "--persistent", "--p2p", domname, address, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].endswith(
        "Destination libvirt does not support peer-to-peer migration protocol")
    assert servicer.prepares == 0 and domname in a.names()


class OlderDestination(pb_grpc.MigrationDestinationServiceServicer):
    """A dstd from before PrepareFinish: forwards capabilities, Prepare and Finish to a real
    dstd, and answers PrepareFinish UNIMPLEMENTED (grpc's default for a missing method)."""

    def __init__(self, real: str) -> None:
        self.channel = grpc.insecure_channel(real, options=[("grpc.enable_http_proxy", 0)])
        self.stub = pb_grpc.MigrationDestinationServiceStub(self.channel)
        self.calls: list[str] = []

    def GetCapabilities(self, request: pb.CapabilitiesRequest, context: grpc.ServicerContext) -> pb.CapabilitiesResponse:
        return self.stub.GetCapabilities(request, timeout=10)

    def Prepare(self, request: pb.PrepareRequest, context: grpc.ServicerContext) -> pb.PrepareResponse:
        self.calls.append("Prepare")
        return self.stub.Prepare(request, timeout=10)

    def Finish(self, request: pb.FinishRequest, context: grpc.ServicerContext) -> pb.FinishResponse:
        self.calls.append("Finish")
        return self.stub.Finish(request, timeout=10)


@pytest.mark.parametrize("mode", [["--p2p"], []], ids=["p2p", "client-driven"])
def test_destination_without_prepare_finish_gets_two_calls(
        hosts: tuple[Host, Host], domname: str, mode: list[str]) -> None:
    """An older dstd answers PrepareFinish UNIMPLEMENTED (relayed as such by srcd for a
    client-driven migration): the same migration goes through as Prepare and Finish."""
    a, b = hosts
    servicer = OlderDestination(b.dst)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_MigrationDestinationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.3:0")
    server.start()
    try:
        a.define(sample_domain_xml(domname), f"{domname}.xml")
        a.migctl("migrate", "--offline", "--persistent", "--undefinesource", *mode, domname,
                 f"127.0.0.3:{port}")
    finally:
        server.stop(grace=None)
        servicer.channel.close()
    assert servicer.calls == ["Prepare", "Finish"]
    assert domname in b.names() and domname not in a.names()
    assert a.journal() == [] and b.journal() == []
    b.migctl("undefine", domname)
