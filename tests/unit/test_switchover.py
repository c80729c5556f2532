"""The live switch-over policy (srcd/switchover.py) and how Perform's watch applies it."""

from __future__ import annotations

import asyncio
import contextlib
import types
from typing import Any

import pytest
from vmmigrate.common.rpc import Deadline
from vmmigrate.srcd import perform
from vmmigrate.srcd.jobs import SourceJob, SourceParams
from vmmigrate.srcd.switchover import (
    SwitchoverPolicy,
    changed_enough,
    measured_bandwidth,
    passes_of,
)

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("bandwidth", "passes", "limit"),
    [
        (0, 0, 20),  # nothing measured yet, no cap: the floor
        (1.5e9, 0, 20),  # a fast link: 16 MiB take 11 ms, the floor holds
        (1.5e9, 2, 20),  # the first full pass is no reason to escalate
        (1.5e9, 3, 40),  # a pass that did not converge: doubled
        (1.5e9, 4, 80),
        (1.5e9, 6, 300),  # ... up to the ceiling, QEMU's default
        (1.5e9, 40, 300),
        (400 * MIB, 0, 40),  # 16 MiB at 400 MiB/s
        (100e6, 0, 167),  # a 1 GbE-like link: 16 MiB take 168 ms
        (10e6, 0, 300),  # a slow link: the ceiling, as QEMU's default
    ],
)
def test_limit_follows_bandwidth_and_escalates(bandwidth: float, passes: int, limit: int) -> None:
    assert SwitchoverPolicy().limit_ms(bandwidth_bps=bandwidth, passes=passes) == limit


def test_configured_floor_and_ceiling() -> None:
    p = SwitchoverPolicy(floor_ms=50, ceiling_ms=60)
    assert p.limit_ms(bandwidth_bps=0) == 50
    assert p.limit_ms(bandwidth_bps=1e9, passes=9) == 60
    # a ceiling below the floor (refused by the config) would never lower the floor
    assert SwitchoverPolicy(floor_ms=50, ceiling_ms=10).limit_ms(bandwidth_bps=0) == 50


def test_figures_from_query_migrate() -> None:
    info = {"status": "active", "ram": {"mbps": 8000.0, "dirty-sync-count": 3}}
    assert measured_bandwidth(info) == 1e9 and passes_of(info) == 3
    assert measured_bandwidth({"status": "setup"}) == 0.0 and passes_of({}) == 0
    assert measured_bandwidth({"ram": {"mbps": "junk"}}) == 0.0
    assert passes_of({"ram": {"dirty-sync-count": None}}) == 0


def test_hysteresis() -> None:
    assert not changed_enough(40, 45) and changed_enough(40, 50) and changed_enough(40, 20)


class StreamHypervisor:
    """query-migrate answers from a script of (status, mbps, passes); records commands."""

    def __init__(self, script: list[tuple[str, float, int]]) -> None:
        self.script = script
        self.commands: list[tuple[str, Any]] = []
        self.on_query: Any = None

    async def execute(self, uuid: str, command: str, args: Any = None) -> dict[str, Any]:
        self.commands.append((command, args))
        if command != "query-migrate":
            return {}
        if self.on_query is not None:
            self.on_query()
        status, mbps, passes = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        info: dict[str, Any] = {"status": status, "ram": {"mbps": mbps, "dirty-sync-count": passes}}
        if status == "completed":
            info.update({"total-time": 100, "downtime": 5})
        return info


def _job() -> SourceJob:
    domain = types.SimpleNamespace(uuid="u", name="vm")
    return SourceJob(
        migration_id="m",
        domain=domain,  # type: ignore[arg-type]
        flags=perform.MigrateFlag.LIVE,
        params=SourceParams(),
        peer="127.0.0.1:1",
        deadline=Deadline(60.0),
        record=None,  # type: ignore[arg-type]
        lock=None,  # type: ignore[arg-type]
        cleanup=contextlib.AsyncExitStack(),
    )


def _ctx(hv: StreamHypervisor, given: dict[str, int]) -> Any:
    return types.SimpleNamespace(
        hypervisor=hv,
        max_downtime_ms=given,
        config=types.SimpleNamespace(migration_poll_interval=0.0001),
    )


def _limits(hv: StreamHypervisor) -> list[int]:
    return [a["downtime-limit"] for c, a in hv.commands if c == "migrate-set-parameters"]


def _watch(hv: StreamHypervisor, given: dict[str, int]) -> None:
    w = perform._Watch(started=0.0, policy=SwitchoverPolicy(), downtime_ms=20)
    asyncio.run(perform._watch(_ctx(hv, given), _job(), asyncio.Queue(), None, w))


def test_watch_follows_the_measured_bandwidth() -> None:
    # 800 Mbit/s = 100 MB/s: 16 MiB take 168 ms; a non-converging pass doubles it (300 max);
    # small moves of the figure are not sent
    hv = StreamHypervisor([
        ("active", 0.0, 1),
        ("active", 800.0, 1),
        ("active", 780.0, 2),
        ("active", 800.0, 3),
        ("completed", 800.0, 3),
    ])
    _watch(hv, {})
    assert _limits(hv) == [167, 300]


def test_setmaxdowntime_overrides_the_policy() -> None:
    # a limit set by migrate-setmaxdowntime during the migration: the policy stops there
    given: dict[str, int] = {}
    hv = StreamHypervisor([
        ("active", 800.0, 1),
        ("active", 80.0, 1),
        ("completed", 80.0, 1),
    ])
    hv.on_query = lambda: given.setdefault("u", 75) if len(hv.commands) > 2 else None
    _watch(hv, given)
    assert _limits(hv) == [167]
