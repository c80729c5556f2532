"""Failpoints: named places in the code where a test can make a daemon crash, fail or stall.

Armed from one string, read once by each daemon's main() from ``VMMIGRATE_FAILPOINTS``:

    VMMIGRATE_FAILPOINTS="dstd.finish.before_persist=crash;srcd.confirm.before=error"

Actions: ``crash`` (the process exits at once with status 137, no cleanup, like SIGKILL),
``error`` (the phase fails with OperationFailed), ``delay(MS)`` (sleep, then go on).
``ACTION@PCT`` fires only on PCT percent of the hits, at random (soak tests); the random
sequence is seeded from ``VMMIGRATE_FAILPOINT_SEED`` when set.
An unarmed failpoint costs one dict lookup on an empty dict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import time

import structlog
from vmmigrate.common.errors import InvalidArgument, OperationFailed

log = structlog.get_logger("vmmigrate.failpoints")

ENV_VAR = "VMMIGRATE_FAILPOINTS"

# Every failpoint in the code base, by daemon. `srcd --list-failpoints` prints these.
SRCD_FAILPOINTS = (
    "srcd.begin.after_journal",
    "srcd.prepare.before",
    "srcd.prepare.after",
    "srcd.perform.before_migrate",
    "srcd.perform.after_migrate",
    "srcd.finish.before",
    "srcd.finish.after",
    # a PrepareBatch / FinishBatch answered, before its answers reach the migrations
    "srcd.prepare.batch_answered",
    "srcd.finish.batch_answered",
    "srcd.confirm.before",
    "srcd.confirm.before_undefine",
    "srcd.confirm.after_undefine",
    "srcd.confirm.after",
)
DSTD_FAILPOINTS = (
    "dstd.prepare.before_reserve",
    "dstd.prepare.after_reserve",
    "dstd.prepare.before_create",
    "dstd.prepare.after_create",
    "dstd.prepare.after_start",
    "dstd.finish.before",
    "dstd.finish.before_persist",
    "dstd.finish.after_persist",
    # a group commit of several definitions (a FinishBatch, or concurrent Finishes), after
    # the first half of them were renamed into place and before the rest
    "dstd.finish.persist_group_midway",
    "dstd.finish.after_outcome",
    "dstd.finish.after",
)
ALL_FAILPOINTS = frozenset(SRCD_FAILPOINTS + DSTD_FAILPOINTS)

_ACTION_RE = re.compile(r"^(crash|error|delay\((\d+)\))(?:@(\d+(?:\.\d+)?))?$")
SEED_VAR = "VMMIGRATE_FAILPOINT_SEED"


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # crash | error | delay
    delay_ms: int = 0
    percent: float = 100.0  # how often it fires when hit


class Failpoints:
    """The armed failpoints of one process."""

    def __init__(self, armed: dict[str, Action] | None = None, seed: str | None = None) -> None:
        self._armed = armed or {}
        self._random = random.Random(seed)

    @classmethod
    def parse(cls, spec: str, seed: str | None = None) -> Failpoints:
        armed: dict[str, Action] = {}
        for item in filter(None, (p.strip() for p in spec.split(";"))):
            name, sep, action = item.partition("=")
            name, action = name.strip(), action.strip()
            if not sep or name not in ALL_FAILPOINTS:
                raise InvalidArgument(f"unknown failpoint {name!r} in {ENV_VAR}")
            m = _ACTION_RE.match(action)
            if m is None:
                raise InvalidArgument(
                    f"failpoint {name}: unknown action {action!r} "
                    "(crash, error, delay(MS), each optionally @PERCENT)"
                )
            percent = float(m.group(3)) if m.group(3) else 100.0
            if not 0 < percent <= 100:
                raise InvalidArgument(f"failpoint {name}: percent must be in (0, 100]")
            kind = "delay" if m.group(2) else m.group(1)
            armed[name] = Action(kind, int(m.group(2) or 0), percent)
        return cls(armed, seed)

    def __bool__(self) -> bool:
        return bool(self._armed)

    def hit_sync(self, name: str) -> None:
        """:meth:`hit` from blocking code (a worker thread): a delay sleeps the thread."""
        action = self._fire(name)
        if action is not None:
            time.sleep(action.delay_ms / 1000)

    def _fire(self, name: str) -> Action | None:
        """Crash or raise if armed so; the delay action to wait for, or None."""
        action = self._armed.get(name)
        if action is None:
            return None
        if action.percent < 100 and self._random.random() * 100 >= action.percent:
            return None
        log.warning("failpoint_hit", failpoint=name, action=action.kind)
        if action.kind == "crash":
            os._exit(137)
        if action.kind == "error":
            raise OperationFailed(f"failpoint {name} injected an error")
        return action

    async def hit(self, name: str) -> None:
        """Run the action armed at ``name``, if any."""
        action = self._fire(name)
        if action is not None:
            await asyncio.sleep(action.delay_ms / 1000)
