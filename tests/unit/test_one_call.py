"""When srcd sends an offline migration's Prepare and Finish as one PrepareFinish call."""

from __future__ import annotations

from vmmigrate.common.failpoints import Failpoints
from vmmigrate.srcd.context import OneCalls


def test_failpoint_armed_is_known_without_firing() -> None:
    fp = Failpoints.parse("srcd.prepare.after=crash@1")
    assert fp.armed("srcd.prepare.after")
    assert not fp.armed("srcd.finish.before")
    assert not Failpoints().armed("srcd.prepare.after")


def test_one_calls_in_flight_per_destination() -> None:
    calls = OneCalls()
    assert not calls.busy("b:1")
    calls.started("b:1")
    calls.started("b:1")
    assert calls.busy("b:1") and not calls.busy("c:1")
    calls.ended("b:1")
    assert calls.busy("b:1")
    calls.ended("b:1")
    assert not calls.busy("b:1") and calls.in_flight == {}
