"""The tunnel's wire contract (TunnelBytes.Carry, common/tunnelwire.py): raw bytes, the
migration id in metadata, dstd's messages framed with credit. Real daemons, simvm guests."""

from __future__ import annotations

import time
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


def test_the_old_tunnel_encodings_are_gone(hosts: tuple[Host, Host]) -> None:
    """No release shipped the proto's Tunnel (TunnelChunk messages) or the unframed stream:
    dstd serves neither, nor advertises the features that chose between them."""
    _, b = hosts
    with grpc.insecure_channel(b.dst, options=OPTS) as ch:
        with pytest.raises(grpc.RpcError) as err:
            list(ch.stream_stream(DEST_SERVICE + "Tunnel")(iter([b""]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        caps = pb_grpc.MigrationDestinationServiceStub(ch).GetCapabilities(
            pb.CapabilitiesRequest(), timeout=10
        )
    assert not {"TUNNEL_BYTES", "TUNNEL_CREDIT"} & set(caps.features)


def forward_unary(channel: grpc.Channel, method: str) -> Any:
    """A handler passing one unary method on to the real dstd."""

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            reply: bytes = channel.unary_unary(method)(request, timeout=60)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
        return reply

    return grpc.unary_unary_rpc_method_handler(unary)


class CreditWatcher(grpc.GenericRpcHandler):
    """A proxy in front of a real dstd that forwards everything, TunnelBytes included, and
    watches the tunnel: how far the source ran ahead of the credit it had been given."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.calls: list[dict[str, str]] = []  # each Carry call's metadata
        self.sent = 0  # bytes the source sent so far
        self.credited = 0  # credit passed back to the source so far
        self.ahead = 0  # the most sent beyond credit, seen here

    def service(self, details: Any) -> Any:
        method: str = details.method
        if method == tunnelwire.METHOD:
            return grpc.stream_stream_rpc_method_handler(self._carry)
        if not method.startswith(DEST_SERVICE):
            return None

        return forward_unary(self.channel, method)

    def _carry(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        md = {k: v for k, v in context.invocation_metadata() if k.startswith("vmmigrate-")}
        self.calls.append(md)
        forward = [(tunnelwire.MIGRATION_ID_KEY, md[tunnelwire.MIGRATION_ID_KEY])]

        def counted() -> Iterator[bytes]:
            for chunk in requests:
                self.sent += len(chunk)
                self.ahead = max(self.ahead, self.sent - self.credited)
                yield chunk

        for msg in self.channel.stream_stream(tunnelwire.METHOD)(
            counted(), metadata=forward, timeout=60
        ):
            if msg:  # every message but the final EOF is a frame
                _, credit = tunnelwire.parse_frame(msg)
                if credit is not None:
                    self.credited = credit
            yield msg


def test_tunnel_credit_bounds_what_is_in_flight(hosts: tuple[Host, Host], domname: str) -> None:
    a, b = hosts
    with grpc.insecure_channel(b.dst, options=OPTS) as ch:
        proxy = CreditWatcher(ch)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTS)
        server.add_generic_rpc_handlers((proxy,))
        port = server.add_insecure_port("127.0.0.6:0")
        server.start()
        try:
            u = start_domain(a, domname, memory_mib=64)
            a.migctl("migrate", "--live", "--p2p", "--tunnelled", domname, f"127.0.0.6:{port}")
            # srcd asks Finish as soon as its emulator is done, while the last bytes cross
            # (the destination resumes only once its emulator has them all): the last
            # credit may come just after the migration's answer
            until = time.monotonic() + 10
            while proxy.credited < proxy.sent and time.monotonic() < until:
                time.sleep(0.01)
        finally:
            server.stop(grace=None)
    assert len(proxy.calls) == 1  # one stream, named by its metadata alone
    assert set(proxy.calls[0]) == {tunnelwire.MIGRATION_ID_KEY}
    assert proxy.sent > 64 * 1024 * 1024  # the guest's RAM crossed
    assert proxy.credited == proxy.sent  # every byte was handed to the emulator
    assert proxy.ahead <= tunnelwire.CREDIT_WINDOW + tunnelwire.CHUNK
    assert state(b, domname) == "running"
    sums = checksum(b, u)
    assert sums["source-sha256"] == sums["sha256"]
    b.migctl("destroy", domname)
