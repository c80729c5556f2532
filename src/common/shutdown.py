"""Graceful stop: once a daemon got SIGTERM, it starts no new migration.

The gate is a server interceptor. While open it passes every call through; once closed
it refuses the calls that start a migration (p2p Migrate and client-driven Begin on srcd,
Prepare on dstd) with UNAVAILABLE ``daemon is shutting down`` (:class:`ShuttingDown`), and
lets every other call through, so that the migrations in flight can finish (Perform,
Finish, Confirm, the tunnel) within the grace period. What has not finished by then is left
to recovery at the next start, as after a crash.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from vmmigrate.common.errors import ShuttingDown
from vmmigrate.common.rpc import status_of

# Full method names of the calls that begin a migration on this host.
STARTS_MIGRATION = frozenset(
    {
        "/vmmigrate.v1.DomainService/Migrate",
        "/vmmigrate.v1.MigrationSourceService/Begin",
        "/vmmigrate.v1.MigrationDestinationService/Prepare",
        "/vmmigrate.v1.MigrationDestinationService/PrepareTunnel",
    }
)
MESSAGE = "daemon is shutting down"


class ShutdownGate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, refused: frozenset[str] = STARTS_MIGRATION) -> None:
        self.refused = refused
        self.closed = False
        # the daemon's refusal count (metrics), set when it serves
        self.on_refused: Callable[[grpc.StatusCode], None] | None = None

    def close(self) -> None:
        self.closed = True

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if not self.closed or handler is None or handler.unary_unary is None:
            return handler
        if str(handler_call_details.method) not in self.refused:
            return handler

        async def refuse(request: Any, context: Any) -> Any:
            code, message, metadata = status_of(ShuttingDown(MESSAGE))
            if self.on_refused is not None:
                self.on_refused(code)
            await context.abort(code, message, trailing_metadata=tuple(metadata))

        return handler._replace(unary_unary=refuse)
