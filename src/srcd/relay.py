"""The destination's calls of a client-driven migration, relayed by srcd.

dstd accepts host certificates only (common/authz.py), so a client that drives a migration
itself reaches the destination through the source host: srcd forwards each request as it
is to the dstd the client names (capabilities it learnt in the last few seconds it answers
itself), on the same channels as its own peer-to-peer migrations
(with its host certificate), within the caller's deadline, and answers with dstd's answer
or its error (same class, same code: the client's retry logic sees what dstd said).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmmigrate.common.address import DEFAULT_DSTD_PORT, format_hostport, parse_hostport
from vmmigrate.common.errors import InvalidArgument
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.rpc import call
from vmmigrate.common.v3client import DEST
from vmmigrate.srcd.context import SourceContext

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

# Left of the caller's deadline for srcd's own answer to reach it, seconds: dstd's deadline
# error must arrive before the client's own deadline passes.
ANSWER_MARGIN = 0.05


def _address(text: str) -> str:
    if not text:
        raise InvalidArgument("missing destination address")
    host, port = parse_hostport(text, DEFAULT_DSTD_PORT)
    return format_hostport(host, port)


def _timeout(ctx: SourceContext, context: Any) -> float:
    left = context.time_remaining()
    if left is None:
        return ctx.config.rpc_timeout
    return max(float(left) - ANSWER_MARGIN, 0.001)


async def _forward(
    ctx: SourceContext,
    dest_address: str,
    method: Callable[[pb_grpc.MigrationDestinationServiceStub], Any],
    request: Any,
    context: Any,
) -> Any:
    """Send ``request`` to the named dstd's ``method`` and return its answer."""
    address = _address(dest_address)
    stub = ctx.peers.destination(address)
    return await call(
        method(stub), request, timeout=_timeout(ctx, context), peer=address, what=DEST
    )


async def capabilities(
    ctx: SourceContext, request: pb.RelayCapabilitiesRequest, context: Any
) -> pb.CapabilitiesResponse:
    """dstd's capabilities: what this srcd learnt from it in the last PeerPool.CAPS_TTL
    seconds (its own p2p migrations ask the same cache), else asked now and remembered. A
    client-driven migration then costs one relayed call fewer, as a p2p one does."""
    address = _address(request.dest_address)
    cached = ctx.peers.cached_caps(address)
    if cached is not None:
        return cached
    caps: pb.CapabilitiesResponse = await _forward(
        ctx, address, lambda d: d.GetCapabilities, request.request, context
    )
    ctx.peers.remember_caps(address, caps)
    return caps


async def prepare(
    ctx: SourceContext, request: pb.RelayPrepareRequest, context: Any
) -> pb.PrepareResponse:
    tunnelled = bool(request.request.header.flags & int(MigrateFlag.TUNNELLED))
    prepared: pb.PrepareResponse = await _forward(
        ctx,
        request.dest_address,
        lambda d: d.PrepareTunnel if tunnelled else d.Prepare,
        request.request,
        context,
    )
    return prepared


async def finish(
    ctx: SourceContext, request: pb.RelayFinishRequest, context: Any
) -> pb.FinishResponse:
    finished: pb.FinishResponse = await _forward(
        ctx, request.dest_address, lambda d: d.Finish, request.request, context
    )
    return finished
