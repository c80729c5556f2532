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

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from vmmigrate.common.config import parse_hostport

log = structlog.get_logger("vmmigrate.metrics")

# What a refused RPC is counted as, by the status code of its error (every error class
# carries one: common/errors.py). Codes not here are failures, not refusals.
_REFUSAL_REASONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid-state",
    grpc.StatusCode.NOT_FOUND: "no-domain",
    grpc.StatusCode.ALREADY_EXISTS: "exists",
    grpc.StatusCode.ABORTED: "job-active",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "busy",
    grpc.StatusCode.PERMISSION_DENIED: "forbidden",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
}

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

    def refused(self, code: grpc.StatusCode) -> None:
        reason = _REFUSAL_REASONS.get(code)
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
