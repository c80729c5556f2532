"""Prometheus metrics of one daemon, on a registry of its own (never the process-wide
default one: two daemons in one test process, or a test's own registry, must not mix).

Served by prometheus_client's own HTTP server on a thread (``--metrics-listen``), off by
default. The names carry a ``role`` label (source on srcd, destination on dstd) so that a
host's two daemons can be scraped into one view.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from vmmigrate.common.config import parse_hostport
from vmmigrate.common.errors import (
    ArgumentUnsupported,
    ConfigUnsupported,
    DomainExists,
    HostBusy,
    HostResourceMissing,
    InvalidArgument,
    JobActive,
    MigrateUnsafe,
    NoDomain,
    NoNetwork,
    OperationInvalid,
    PermissionDenied,
    ShuttingDown,
    Unauthenticated,
    VmmigrateError,
)

log = structlog.get_logger("vmmigrate.metrics")

# What a refused RPC is counted as, by the class of its error: the nearest class in its MRO
# that is listed here (so XMLError counts as "invalid", SameHost as "invalid-state"). The
# status code alone cannot say it: NoDomain and NoNetwork are both NOT_FOUND, ShuttingDown
# is UNAVAILABLE like an unreachable peer (a failure, not a refusal). Classes not here
# (PeerUnavailable, Timeout, OperationFailed, OperationAborted, StorageError and
# StorageFull, anything unexpected) are failures, not refusals.
_REFUSAL_REASONS: dict[type[VmmigrateError], str] = {
    InvalidArgument: "invalid",
    OperationInvalid: "invalid-state",
    ArgumentUnsupported: "unsupported",
    ConfigUnsupported: "config-unsupported",
    MigrateUnsafe: "unsafe",
    HostResourceMissing: "missing-resource",
    NoDomain: "no-domain",
    NoNetwork: "no-network",
    DomainExists: "exists",
    JobActive: "job-active",
    HostBusy: "busy",
    ShuttingDown: "shutting-down",
    PermissionDenied: "forbidden",
    Unauthenticated: "unauthenticated",
}

# every reason a refusal may be counted under (docs/ARCHITECTURE.md section 12)
REFUSAL_REASONS = frozenset(_REFUSAL_REASONS.values())


def refusal_reason(exc: BaseException) -> str | None:
    """The refusals metric's reason for ``exc``; None when it is a failure, not a refusal."""
    for cls in type(exc).__mro__:
        reason = _REFUSAL_REASONS.get(cls)
        if reason is not None:
            return reason
    return None


# seconds: a phase lasts from a few milliseconds (offline Begin) to minutes (a live
# stream of a large guest)
_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class Metrics:
    """The metrics of one daemon (``role``: source or destination)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.migrations = Counter(
            "vmmigrate_migrations",
            "Finished migrations by kind (offline, live), mode and result",
            ["role", "kind", "mode", "result"],
            registry=r,
        )
        self.phase_seconds = Histogram(
            "vmmigrate_migration_phase_seconds",
            "Time a migration spent in each phase",
            ["role", "phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "vmmigrate_migration_bytes",
            "Bytes moved by migrations (live: the stream's bytes)",
            ["role"],
            registry=r,
        )
        self.in_flight = Gauge(
            "vmmigrate_migrations_in_flight", "Migrations under way", ["role"], registry=r
        )
        self.recovery = Counter(
            "vmmigrate_recovery_actions",
            "What recovery did with a migration it found unfinished",
            ["role", "action"],
            registry=r,
        )
        self.refusals = Counter(
            "vmmigrate_refusals",
            "Refused requests by reason",
            ["role", "reason"],
            registry=r,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def track_in_flight(self, count: Callable[[], int]) -> None:
        self.in_flight.labels(self.role).set_function(lambda: float(count()))

    def finished(self, kind: str, mode: str, result: str, moved: int) -> None:
        self.migrations.labels(self.role, kind, mode, result).inc()
        if moved > 0:
            self.bytes.labels(self.role).inc(moved)

    def phases(self, durations: list[tuple[str, float]]) -> None:
        for phase, seconds in durations:
            self.phase_seconds.labels(self.role, phase).observe(max(seconds, 0.0))

    def recovered(self, action: str) -> None:
        self.recovery.labels(self.role, action).inc()

    def refused(self, exc: BaseException) -> None:
        reason = refusal_reason(exc)
        if reason is not None:
            self.refusals.labels(self.role, reason).inc()

    def serve(self, listen: str) -> str:
        """Serve /metrics on ``listen`` (HOST:PORT; port 0 picks one); returns the bound
        address."""
        host, port = parse_hostport(listen, 0)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_port)
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log.info("metrics_listening", metrics=address)
        return address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
