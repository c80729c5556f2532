"""Prometheus metrics of one daemon, on a registry of its own (never the process-wide
default one: two daemons in one test process, or a test's own registry, must not mix).

Served by prometheus_client's own HTTP server on a thread (``--metrics-listen``), off by
default. The names carry a ``role`` label (source on srcd, destination on dstd) so that a
host's two daemons can be scraped into one view.

The values are kept here, in plain dictionaries, and handed to prometheus_client by a
collector only when something reads the registry (a scrape, a test): a daemon that does not
serve metrics never imports it (about 3 MiB of its memory, with the HTTP server it brings),
and counting a migration is a few dictionary updates, not prometheus_client's locks and
label lookups.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
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


# name -> (help, label names) of the counters, as exposed (with "_total")
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vmmigrate_migrations": (
        "Finished migrations by kind (offline, live), mode and result",
        ("role", "kind", "mode", "result"),
    ),
    "vmmigrate_migration_bytes": (
        "Bytes moved by migrations (live: the stream's bytes)",
        ("role",),
    ),
    "vmmigrate_recovery_actions": (
        "What recovery did with a migration it found unfinished",
        ("role", "action"),
    ),
    "vmmigrate_refusals": ("Refused requests by reason", ("role", "reason")),
}
_PHASES = "vmmigrate_migration_phase_seconds"
_IN_FLIGHT = "vmmigrate_migrations_in_flight"


class _Histogram:
    """One label set's observations: a count per bucket (not cumulative), sum, creation."""

    def __init__(self) -> None:
        self.counts = [0] * (len(_PHASE_BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_PHASE_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        bounds = [repr(float(b)) for b in _PHASE_BUCKETS] + ["+Inf"]
        out, total = [], 0
        for bound, n in zip(bounds, self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


class Metrics:
    """The metrics of one daemon (``role``: source or destination)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._lock = threading.Lock()  # the collector reads from the HTTP server's thread
        # (counter name, label values) -> [value, creation time]
        self._counters: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        self._phases: dict[tuple[str, str], _Histogram] = {}
        self._in_flight: Callable[[], int] | None = None
        self._registry: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _inc(self, name: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
        with self._lock:
            series = self._counters.get((name, labels))
            if series is None:
                self._counters[(name, labels)] = [amount, time.time()]
            else:
                series[0] += amount

    def track_in_flight(self, count: Callable[[], int]) -> None:
        self._in_flight = count

    def finished(self, kind: str, mode: str, result: str, moved: int) -> None:
        self._inc("vmmigrate_migrations", (self.role, kind, mode, result))
        if moved > 0:
            self._inc("vmmigrate_migration_bytes", (self.role,), moved)

    def phases(self, durations: list[tuple[str, float]]) -> None:
        with self._lock:
            for phase, seconds in durations:
                hist = self._phases.get((self.role, phase))
                if hist is None:
                    hist = self._phases[(self.role, phase)] = _Histogram()
                hist.observe(max(seconds, 0.0))

    def recovered(self, action: str) -> None:
        self._inc("vmmigrate_recovery_actions", (self.role, action))

    def refused(self, exc: BaseException) -> None:
        reason = refusal_reason(exc)
        if reason is not None:
            self._inc("vmmigrate_refusals", (self.role, reason))

    def collect(self) -> Iterator[Any]:
        """The metric families, as prometheus_client's collectors yield them."""
        from prometheus_client.core import (  # noqa: PLC0415 (see the module docstring)
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            counters = {key: tuple(v) for key, v in self._counters.items()}
            phases = {key: (h.cumulative(), h.sum, h.created) for key, h in self._phases.items()}
        for name, (doc, labels) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for (metric, values), (value, created) in sorted(counters.items()):
                if metric == name:
                    family.add_metric(values, value, created=created)
            yield family
        doc = "Time a migration spent in each phase"
        hist = HistogramMetricFamily(_PHASES, doc, labels=("role", "phase"))
        # prometheus_client's own Histogram adds its creation times as a gauge
        births = GaugeMetricFamily(f"{_PHASES}_created", doc, labels=("role", "phase"))
        for values, (buckets, total, since) in sorted(phases.items()):
            hist.add_metric(values, buckets, total)
            births.add_metric(values, since)
        yield hist
        yield births
        gauge = GaugeMetricFamily(_IN_FLIGHT, "Migrations under way", labels=("role",))
        if self._in_flight is not None:
            gauge.add_metric((self.role,), float(self._in_flight()))
        yield gauge

    @property
    def registry(self) -> Any:
        """A prometheus_client registry of these metrics (made, and prometheus_client
        imported, at the first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry  # noqa: PLC0415

            self._registry = CollectorRegistry(auto_describe=True)
            self._registry.register(self)
        return self._registry

    def serve(self, listen: str) -> str:
        """Serve /metrics on ``listen`` (HOST:PORT; port 0 picks one); returns the bound
        address."""
        from prometheus_client import start_http_server  # noqa: PLC0415

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
