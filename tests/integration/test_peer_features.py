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
