"""Graceful stop: once a daemon got SIGTERM, it starts no new migration.

The gate is a server interceptor. While open it passes every call through; once closed
it refuses the calls that start a migration (p2p Migrate and client-driven Begin on srcd,
Prepare on dstd) with UNAVAILABLE ``daemon is shutting down`` (:class:`ShuttingDown`), and
lets every other call through, so that the migrations in flight can finish (Perform,
Finish, Confirm, the tunnel) within the grace period. What has not finished by then is left
to recovery at the next start, as after a crash.
"""

from __future__ import annotations

from typing import Any

from vmmigrate.common.errors import ShuttingDown
from vmmigrate.common.interceptor import HandlerInterceptor, OnRefused, refuse

# Full method names of the calls that begin a migration on this host.
STARTS_MIGRATION = frozenset(
    {
        "/vmmigrate.v1.DomainService/Migrate",
        "/vmmigrate.v1.MigrationSourceService/Begin",
        "/vmmigrate.v1.MigrationDestinationService/Prepare",
        "/vmmigrate.v1.MigrationDestinationService/PrepareTunnel",
        "/vmmigrate.v1.MigrationDestinationService/PrepareBatch",
    }
)
MESSAGE = "daemon is shutting down"


class ShutdownGate(HandlerInterceptor):
    def __init__(self, refused: frozenset[str] = STARTS_MIGRATION) -> None:
        self.refused = refused
        self.closed = False
        # the daemon's refusal count (metrics), set when it serves
        self.on_refused: OnRefused | None = None

    def close(self) -> None:
        self.closed = True

    def wrap(self, handler: Any, method: str) -> Any:
        if not self.closed or handler.unary_unary is None or method not in self.refused:
            return handler

        async def refused(request: Any, context: Any) -> Any:
            await refuse(context, ShuttingDown(MESSAGE), self.on_refused)

        return handler._replace(unary_unary=refused)
