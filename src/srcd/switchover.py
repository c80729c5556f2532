"""The switch-over policy of a live migration: the downtime limit the source emulator gets.

QEMU stops the guest for the last copy once what is left to send fits in ``downtime-limit``
at its measured bandwidth (``threshold = bandwidth x downtime-limit``). Its default, 300 ms
(which libvirt leaves alone), is a pause that grows with the link: on a fast link QEMU
stops the guest with hundreds of MiB still to send. vmmigrate's default instead:

- a **stop-and-copy budget** in bytes (16 MiB): the limit is the time that budget takes at
  the bandwidth measured so far (the ``max-bandwidth`` cap before QEMU has measured any), so
  a hot working set of that size can always go in the last copy, whatever the link;
- never below a **floor** (``downtime_limit_ms``, 20 ms by default): on a fast link the
  guest is paused for about that long, not for 300 ms;
- **escalation**: every pass over memory after the second that did not end the migration
  doubles the limit, up to a **ceiling** (``downtime_limit_max_ms``, QEMU's 300 ms by
  default), so a guest that dirties memory faster than a short pause allows still
  converges, as it would with QEMU's default, a few passes later.

``migctl migrate-setmaxdowntime`` (QMP ``downtime-limit``, libvirt's
virDomainMigrateSetMaxDowntime) overrides all of it: that limit holds as given, unchanged
for the whole migration.

Pure functions of the migration's figures (table-tested); srcd/perform.py applies them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

STOP_COPY_BUDGET = 16 * 1024 * 1024  # bytes
DEFAULT_FLOOR_MS = 20
DEFAULT_CEILING_MS = 300  # QEMU's own default downtime-limit
FIRST_ESCALATING_PASS = 3  # dirty-sync-count: 1 = set-up, 2 = the first full pass done


@dataclasses.dataclass(frozen=True)
class SwitchoverPolicy:
    floor_ms: int = DEFAULT_FLOOR_MS
    ceiling_ms: int = DEFAULT_CEILING_MS
    budget_bytes: int = STOP_COPY_BUDGET

    def limit_ms(self, *, bandwidth_bps: float, passes: int = 0) -> int:
        """The downtime limit for a stream measured at ``bandwidth_bps`` bytes/s (0:
        unknown) after ``passes`` memory passes (QEMU's dirty-sync-count)."""
        base = float(self.floor_ms)
        if bandwidth_bps > 0:
            base = max(base, self.budget_bytes * 1000.0 / bandwidth_bps)
        doublings = max(0, passes - FIRST_ESCALATING_PASS + 1)
        limit = base * 2 ** min(doublings, 16)
        return int(min(max(limit, self.floor_ms), max(self.ceiling_ms, self.floor_ms)))


# A new limit is sent to the emulator only when it differs from the one it has by this
# share or more: QEMU's bandwidth figure moves by tens of percent every 100 ms.
HYSTERESIS = 0.25


def changed_enough(current_ms: int, new_ms: int) -> bool:
    return abs(new_ms - current_ms) >= HYSTERESIS * max(current_ms, 1)


def measured_bandwidth(info: dict[str, Any]) -> float:
    """The stream's bandwidth, bytes/s, from query-migrate (``ram.mbps``, megabits/s, as
    QEMU computes it every 100 ms); 0 when it has not measured any yet."""
    ram = info.get("ram") or {}
    try:
        return max(float(ram.get("mbps") or 0.0), 0.0) * 1e6 / 8
    except (TypeError, ValueError):
        return 0.0


def passes_of(info: dict[str, Any]) -> int:
    ram = info.get("ram") or {}
    try:
        return int(ram.get("dirty-sync-count") or 0)
    except (TypeError, ValueError):
        return 0
