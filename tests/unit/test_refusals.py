"""The refusals metric: each refused request is counted under the reason its error's class
gives (not its status code alone), also when an interceptor refuses it before any handler."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from vmmigrate.common import errors
from vmmigrate.common.decodeguard import DecodeGuard
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.metrics import REFUSAL_REASONS, Metrics, refusal_reason
from vmmigrate.common.shutdown import MESSAGE, ShutdownGate

from vmmigrate.v1 import vmmigrate_pb2 as pb


@pytest.mark.parametrize(("exc", "reason"), [
    (errors.InvalidArgument("x"), "invalid"),
    (errors.XMLError("x"), "invalid"),
    (errors.CookieError("x"), "invalid"),
    (errors.UnsupportedFlags("x"), "invalid"),
    (errors.OperationInvalid("x"), "invalid-state"),
    (errors.SameHost("x"), "invalid-state"),
    (errors.ArgumentUnsupported("x"), "unsupported"),
    (errors.ConfigUnsupported("x"), "config-unsupported"),
    (errors.MigrateUnsafe("x"), "unsafe"),
    (errors.HostResourceMissing("x"), "missing-resource"),
    (errors.NoDomain("x"), "no-domain"),
    (errors.NoNetwork("Network not found: no network with matching name 'lan'"), "no-network"),
    (errors.DomainExists("x"), "exists"),
    (errors.JobActive("x"), "job-active"),
    (errors.HostBusy("x"), "busy"),
    (errors.ShuttingDown(MESSAGE), "shutting-down"),
    (errors.PermissionDenied("x"), "forbidden"),
    (errors.Unauthenticated("x"), "unauthenticated"),
    # failures, not refusals
    (errors.PeerUnavailable("x"), None),
    (errors.Timeout("x"), None),
    (errors.OperationFailed("x"), None),
    (errors.OperationAborted("x"), None),
    (errors.StorageError("x"), None),
    (errors.StorageFull("x"), None),
    (errors.VmmigrateError("x"), None),
    (RuntimeError("x"), None),
])
def test_reason_comes_from_the_error_class(exc: BaseException, reason: str | None) -> None:
    assert refusal_reason(exc) == reason


def test_a_class_defined_elsewhere_counts_as_its_nearest_listed_base() -> None:
    class NoSuchPool(errors.NoDomain):
        pass

    assert refusal_reason(NoSuchPool("x")) == "no-domain"


def test_every_reason_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `vmmigrate_refusals_total`"))
    assert {r for r in REFUSAL_REASONS if f"`{r}`" not in row} == set()


def _count(m: Metrics, reason: str) -> float:
    return m.registry.get_sample_value(
        "vmmigrate_refusals_total", {"role": "source", "reason": reason}) or 0.0


MIGRATE = "/vmmigrate.v1.DomainService/Migrate"
LIST = "/vmmigrate.v1.DomainService/List"


async def _serve_and_call(metrics: Metrics, calls: list[tuple[str, bytes]]) -> list[grpc.StatusCode]:
    """An in-process server behind the shutdown gate (closed) and the decode guard, both
    counting into ``metrics``; each call's status code."""
    gate = ShutdownGate()
    gate.on_refused = metrics.refused
    gate.close()

    async def answer(request: Any, context: Any) -> pb.ListResponse:
        return pb.ListResponse()

    handler = grpc.unary_unary_rpc_method_handler(
        answer,
        request_deserializer=pb.ListRequest.FromString,
        response_serializer=pb.ListResponse.SerializeToString,
    )
    server = grpc.aio.server(interceptors=[gate, DecodeGuard(metrics.refused)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "vmmigrate.v1.DomainService", {"Migrate": handler, "List": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for method, raw in calls:
                call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
                try:
                    await call(raw, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
    finally:
        await server.stop(None)
    return codes


def test_interceptor_refusals_are_counted_by_reason() -> None:
    """A call the shutdown gate refuses counts as shutting-down (its UNAVAILABLE counted
    under no reason before); one the decode guard refuses as invalid."""
    m = Metrics("source")
    codes = asyncio.run(_serve_and_call(m, [
        (MIGRATE, b""),  # a migration while the daemon stops
        (LIST, b""),  # passes the gate
        (LIST, b"\xff\xff\xff"),  # not protobuf
    ]))
    assert codes == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK,
                     grpc.StatusCode.INVALID_ARGUMENT]
    assert _count(m, "shutting-down") == 1
    assert _count(m, "invalid") == 1
    assert sum(_count(m, r) for r in REFUSAL_REASONS) == 2


def test_handler_refusals_no_network_is_not_no_domain() -> None:
    m = Metrics("source")
    refused: list[VmmigrateError] = [
        errors.NoDomain("no domain with matching name 'x'"),
        errors.NoNetwork("no network with matching name 'lan'"),
        errors.NoNetwork("no network with matching name 'wan'"),
        errors.OperationFailed("not a refusal"),
    ]
    for exc in refused:
        m.refused(exc)
    assert (_count(m, "no-domain"), _count(m, "no-network")) == (1, 2)
