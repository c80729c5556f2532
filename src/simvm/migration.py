"""What both ends of a simvm migration share: the status enum, tunables, and the policy.

Migration status (QEMU's MigrationStatus words, as query-migrate and the MIGRATION event
report them)::

    (none) --migrate--> setup --connected--> active --converged--> completed
                          |                   |  \\
                          |                   |   `--migrate_cancel--> cancelling --> cancelled
                          `-------------------+--error--> failed

A status only moves forward; the one function that moves it is
:meth:`StatusCell.advance`, which refuses anything else and logs every transition.

The precopy policy is a pure function, :func:`decide`, called once per pass with that
pass's numbers; it says whether to switch over now and what the vCPU throttle should be.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("simvm.migration")


class MigrationStatus(enum.Enum):
    NONE = "none"  # no migration yet; query-migrate returns {} (as QEMU)
    SETUP = "setup"  # migrate accepted (source) or listening (destination); next ACTIVE
    ACTIVE = "active"  # pages flowing; next COMPLETED, FAILED or CANCELLING
    CANCELLING = "cancelling"  # migrate_cancel seen, the stream is being torn down; next CANCELLED
    CANCELLED = "cancelled"  # final: cancelled, source VM back in its previous run state
    COMPLETED = "completed"  # final: the destination acknowledged the memory checksum
    FAILED = "failed"  # final: error-desc says why; source VM back in its previous run state


FINAL = frozenset({MigrationStatus.CANCELLED, MigrationStatus.COMPLETED, MigrationStatus.FAILED})
RUNNING = frozenset({MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.CANCELLING})

_ALLOWED: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    MigrationStatus.NONE: frozenset({MigrationStatus.SETUP}),
    MigrationStatus.SETUP: frozenset(
        {MigrationStatus.ACTIVE, MigrationStatus.CANCELLING, MigrationStatus.FAILED}
    ),
    MigrationStatus.ACTIVE: frozenset(
        {MigrationStatus.COMPLETED, MigrationStatus.CANCELLING, MigrationStatus.FAILED}
    ),
    MigrationStatus.CANCELLING: frozenset({MigrationStatus.CANCELLED}),
    MigrationStatus.CANCELLED: frozenset(),
    MigrationStatus.COMPLETED: frozenset(),
    MigrationStatus.FAILED: frozenset(),
}

EmitFn = Callable[[str, dict[str, Any]], None]


class StatusCell:
    """A migration's status, moved by one function, shared between threads."""

    def __init__(self, role: str, emit: EmitFn, events: Callable[[], bool]) -> None:
        self._role = role
        self._emit = emit
        self._events = events
        self._lock = threading.Lock()
        self.value = MigrationStatus.NONE

    def advance(self, new: MigrationStatus) -> bool:
        """Move to ``new``; False (and no change) when that is not a forward step."""
        with self._lock:  # emitting under the lock keeps events in transition order
            old = self.value
            if new not in _ALLOWED[old]:
                return False
            self.value = new
            log.info("migration status %s -> %s (%s)", old.value, new.value, self._role)
            if self._events():  # QEMU sends MIGRATION only with the "events" capability on
                self._emit("MIGRATION", {"status": new.value})
        return True


# QEMU's defaults, except max-bandwidth: QEMU defaults to 128 MiB/s, simvm to unlimited (0,
# which QEMU also reads as "no limit"); the daemons always set it.
DEFAULT_DOWNTIME_LIMIT_MS = 300
DEFAULT_THROTTLE_INITIAL = 20
DEFAULT_THROTTLE_INCREMENT = 10
DEFAULT_MAX_THROTTLE = 99
DEFAULT_TRIGGER_THRESHOLD = 50

# name -> (attribute, lowest, highest, QEMU's wording of the range)
PARAMETER_RANGES: dict[str, tuple[str, int, int, str]] = {
    "max-bandwidth": (
        "max_bandwidth",
        0,
        2**64 - 1,
        "an integer in the range of 0 to 18446744073709551615 bytes/second",
    ),
    "downtime-limit": (
        "downtime_limit",
        0,
        2_000_000,
        "an integer in the range of 0 to 2000 seconds",
    ),
    "cpu-throttle-initial": ("cpu_throttle_initial", 1, 99, "an integer in the range of 1 to 99"),
    "cpu-throttle-increment": (
        "cpu_throttle_increment",
        1,
        99,
        "an integer in the range of 1 to 99",
    ),
    "max-cpu-throttle": ("max_cpu_throttle", 1, 99, "an integer in the range of 1 to 99"),
    "throttle-trigger-threshold": (
        "throttle_trigger_threshold",
        1,
        100,
        "an integer in the range of 1 to 100",
    ),
}


@dataclasses.dataclass
class Parameters:
    """migrate-set-parameters values; read live by a running migration."""

    max_bandwidth: int = 0  # bytes/s, 0 = unlimited
    downtime_limit: int = DEFAULT_DOWNTIME_LIMIT_MS  # ms
    cpu_throttle_initial: int = DEFAULT_THROTTLE_INITIAL  # %
    cpu_throttle_increment: int = DEFAULT_THROTTLE_INCREMENT  # %
    max_cpu_throttle: int = DEFAULT_MAX_THROTTLE  # %
    throttle_trigger_threshold: int = DEFAULT_TRIGGER_THRESHOLD  # % of bytes sent in a pass

    def to_qmp(self) -> dict[str, Any]:
        return {name: getattr(self, attr) for name, (attr, *_rest) in PARAMETER_RANGES.items()}


SUPPORTED_CAPABILITIES = ("auto-converge", "events")


@dataclasses.dataclass
class Capabilities:
    auto_converge: bool = False
    events: bool = False

    def to_qmp(self) -> list[dict[str, Any]]:
        return [
            {"capability": name, "state": bool(getattr(self, name.replace("-", "_")))}
            for name in SUPPORTED_CAPABILITIES
        ]


@dataclasses.dataclass(frozen=True)
class PassStats:
    """What one precopy pass measured, for :func:`decide`."""

    remaining_bytes: int  # dirty bytes found at the sync that ended the pass
    bandwidth: float  # bytes/s measured over the pass (0 when unknown)
    transferred_bytes: int  # bytes sent during the pass
    dirtied_bytes: int  # bytes the guest dirtied during the pass


@dataclasses.dataclass(frozen=True)
class Decision:
    switchover: bool
    throttle: int  # % the vCPU should be throttled by from now on


# Below this, switch over whatever the bandwidth says: a few pages never break a downtime limit.
SWITCHOVER_FLOOR_BYTES = 4 * 4096


def decide(stats: PassStats, params: Parameters, auto_converge: bool, throttle: int) -> Decision:
    """Precopy policy, once per pass: switch over, or keep iterating (maybe throttled).

    Switch over when the remaining dirty bytes fit in downtime-limit at the measured
    bandwidth (QEMU's ``threshold_size = bandwidth * downtime_limit``). Otherwise, with
    auto-converge, a pass in which the guest dirtied more than throttle-trigger-threshold %
    of what was sent raises the throttle: cpu-throttle-initial the first time, then by
    cpu-throttle-increment, up to max-cpu-throttle. (QEMU waits for two such periods of at
    least a second each; simvm reacts to every pass, passes being long at test bandwidths.)
    """
    threshold = stats.bandwidth * params.downtime_limit / 1000.0
    if stats.remaining_bytes <= max(threshold, SWITCHOVER_FLOOR_BYTES):
        return Decision(True, throttle)
    if auto_converge and stats.dirtied_bytes * 100 > (
        stats.transferred_bytes * params.throttle_trigger_threshold
    ):
        step = (
            params.cpu_throttle_initial
            if throttle == 0
            else throttle + (params.cpu_throttle_increment)
        )
        return Decision(False, min(step, params.max_cpu_throttle))
    return Decision(False, throttle)


class TokenBucket:
    """max-bandwidth: a token bucket holding at most ~50 ms of credit, re-read every call."""

    BURST_SECONDS = 0.05

    def __init__(self, rate: Callable[[], int]) -> None:
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def take(self, n: int, cancelled: threading.Event) -> None:
        """Wait until ``n`` bytes may go; returns early when ``cancelled`` is set."""
        rate = self._rate()
        now = time.monotonic()
        if rate <= 0:
            self._tokens = 0.0
            self._stamp = now
            return
        burst = max(rate * self.BURST_SECONDS, float(n))
        self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            cancelled.wait(-self._tokens / rate)

    def batch_pages(self, page_size: int, largest: int) -> int:
        """Pages per batch: ~20 ms of the cap (so cancel and cap changes act fast)."""
        rate = self._rate()
        if rate <= 0:
            return largest
        return max(1, min(largest, int(rate * 0.02) // page_size))
