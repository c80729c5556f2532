"""The tunnel's two encodings (common/tunnelwire.py): TunnelBytes (raw bytes, the migration id
in metadata) and the proto's Tunnel, which dstd still serves and srcd still uses towards a
destination that does not advertise TUNNEL_BYTES. Real daemons, simvm guests."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from helpers.hosts import Host
from helpers.live import checksum, start_domain, state
from vmmigrate.common import tunnelwire

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

OPTS = [("grpc.enable_http_proxy", 0)]
DEST_SERVICE = "/vmmigrate.v1.MigrationDestinationService/"


def test_tunnel_streams_refuse_an_unknown_migration(hosts: tuple[Host, Host]) -> None:
    _, b = hosts
    with grpc.insecure_channel(b.dst, options=OPTS) as ch:
        raw = ch.stream_stream(tunnelwire.METHOD)
        for metadata, mid in (([(tunnelwire.MIGRATION_ID_KEY, "nope")], "nope"), ([], "")):
            with pytest.raises(grpc.RpcError) as err:
                list(raw(iter([b"data"]), metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == f"no tunnelled incoming migration with id '{mid}'"
        stub = pb_grpc.MigrationDestinationServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Tunnel(iter([pb.TunnelChunk(migration_id="nope")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == "no tunnelled incoming migration with id 'nope'"
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Tunnel(iter([]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "empty tunnel stream"


def forward_unary(channel: grpc.Channel, method: str, hide: str | None) -> Any:
    """A handler passing one unary method on to the real dstd; ``hide`` is a capability
    feature left out of GetCapabilities' answer (playing an older dstd)."""

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            reply: bytes = channel.unary_unary(method)(request, timeout=60)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
        if hide is not None and method.endswith("/GetCapabilities"):
            caps = pb.CapabilitiesResponse.FromString(reply)
            caps.features.remove(hide)
            reply = caps.SerializeToString()
        return reply

    return grpc.unary_unary_rpc_method_handler(unary)


class OldDestination(grpc.GenericRpcHandler):
    """A dstd that predates TunnelBytes: forwards the proto's methods to a real dstd, leaves
    TUNNEL_BYTES out of its capabilities and does not serve TunnelBytes."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.tunnels = 0

    def service(self, details: Any) -> Any:
        method: str = details.method
        if not method.startswith(DEST_SERVICE):
            return None
        if method.endswith("/Tunnel"):
            return grpc.stream_stream_rpc_method_handler(self._tunnel)

        return forward_unary(self.channel, method, hide=tunnelwire.FEATURE)

    def _tunnel(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self.tunnels += 1
        return iter(self.channel.stream_stream(DEST_SERVICE + "Tunnel")(requests, timeout=60))


@pytest.fixture
def old_destination(hosts: tuple[Host, Host]) -> Iterator[tuple[str, OldDestination]]:
    _, b = hosts
    with grpc.insecure_channel(b.dst, options=OPTS) as ch:
        handler = OldDestination(ch)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.6:0")
        server.start()
        yield f"127.0.0.6:{port}", handler
        server.stop(grace=None)


def test_tunnelled_migration_to_a_destination_without_tunnel_bytes(
    hosts: tuple[Host, Host], domname: str, old_destination: tuple[str, OldDestination]
) -> None:
    a, b = hosts
    address, handler = old_destination
    u = start_domain(a, domname, memory_mib=64)
    a.migctl("migrate", "--live", "--p2p", "--tunnelled", domname, address)
    assert handler.tunnels == 1  # the proto's Tunnel carried it
    assert state(b, domname) == "running"
    sums = checksum(b, u)
    assert sums["source-sha256"] == sums["sha256"]
    b.migctl("destroy", domname)


class CreditWatcher(grpc.GenericRpcHandler):
    """A proxy in front of a real dstd that forwards everything, TunnelBytes included, and
    watches the tunnel: how far the source ran ahead of the credit it had been given.
    ``credit=False`` plays a dstd that predates TUNNEL_CREDIT (the feature hidden, the
    source's request for credit not passed on)."""

    def __init__(self, channel: grpc.Channel, *, credit: bool) -> None:
        self.channel = channel
        self.credit = credit
        self.asked: list[bool] = []
        self.sent = 0  # bytes the source sent so far
        self.credited = 0  # credit passed back to the source so far
        self.ahead = 0  # the most sent beyond credit, seen here

    def service(self, details: Any) -> Any:
        method: str = details.method
        if method == tunnelwire.METHOD:
            return grpc.stream_stream_rpc_method_handler(self._carry)
        if not method.startswith(DEST_SERVICE):
            return None

        return forward_unary(
            self.channel, method, hide=None if self.credit else tunnelwire.CREDIT_FEATURE
        )

    def _carry(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        md = dict(context.invocation_metadata())
        asked = md.get(tunnelwire.CREDIT_KEY) == "1"
        self.asked.append(asked)
        forward = [(tunnelwire.MIGRATION_ID_KEY, md[tunnelwire.MIGRATION_ID_KEY])]
        if asked and self.credit:
            forward.append((tunnelwire.CREDIT_KEY, "1"))

        def counted() -> Iterator[bytes]:
            for chunk in requests:
                self.sent += len(chunk)
                self.ahead = max(self.ahead, self.sent - self.credited)
                yield chunk

        for msg in self.channel.stream_stream(tunnelwire.METHOD)(
            counted(), metadata=forward, timeout=60
        ):
            if asked and msg:
                _, credit = tunnelwire.parse_frame(msg)
                if credit is not None:
                    self.credited = credit
            yield msg


@pytest.mark.parametrize("credit", [True, False], ids=["credit", "dstd-without-credit"])
def test_tunnel_credit_bounds_what_is_in_flight(
    hosts: tuple[Host, Host], domname: str, credit: bool
) -> None:
    a, b = hosts
    with grpc.insecure_channel(b.dst, options=OPTS) as ch:
        proxy = CreditWatcher(ch, credit=credit)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTS)
        server.add_generic_rpc_handlers((proxy,))
        port = server.add_insecure_port("127.0.0.6:0")
        server.start()
        try:
            u = start_domain(a, domname, memory_mib=64)
            a.migctl("migrate", "--live", "--p2p", "--tunnelled", domname, f"127.0.0.6:{port}")
        finally:
            server.stop(grace=None)
    assert proxy.asked == [credit]  # srcd asks for credit only where it is advertised
    assert proxy.sent > 64 * 1024 * 1024  # the guest's RAM crossed
    if credit:
        assert proxy.credited == proxy.sent  # every byte was handed to the emulator
        assert proxy.ahead <= tunnelwire.CREDIT_WINDOW + tunnelwire.CHUNK
    assert state(b, domname) == "running"
    sums = checksum(b, u)
    assert sums["source-sha256"] == sums["sha256"]
    b.migctl("destroy", domname)
