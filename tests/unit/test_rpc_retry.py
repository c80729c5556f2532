"""call_retrying: a Finish whose earlier call still runs at the destination (JobActive) is
asked again, never taken for a failure: the source would resume a guest that the running
Finish is about to resume there."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from vmmigrate.common.errors import JobActive, Timeout
from vmmigrate.common.rpc import call_retrying


class Peer:
    """A unary method that answers "already running" ``busy`` times, then ``answer``."""

    def __init__(self, busy: int, answer: str = "the first Finish's answer") -> None:
        self.busy = busy
        self.answer = answer
        self.calls = 0

    async def __call__(self, request: Any, *, timeout: float) -> str:
        self.calls += 1
        if self.calls <= self.busy:
            raise JobActive("Finish of migration 'm' is already running")
        return self.answer


def _retrying(peer: Peer, *, until_s: float, while_active: bool) -> Any:
    return asyncio.run(
        call_retrying(
            peer,
            "request",
            timeout=1.0,
            peer="127.0.0.3:1",
            what="destination host",
            until=time.monotonic() + until_s,
            while_active=while_active,
        )
    )


def test_a_running_finish_is_waited_for_and_its_answer_taken() -> None:
    peer = Peer(busy=3)
    assert _retrying(peer, until_s=5.0, while_active=True) == "the first Finish's answer"
    assert peer.calls == 4


def test_a_finish_still_running_at_the_end_is_an_unknown_outcome_not_a_failure() -> None:
    peer = Peer(busy=1000)
    with pytest.raises(Timeout, match="still running an earlier call for this migration"):
        _retrying(peer, until_s=0.5, while_active=True)
    assert peer.calls >= 2


def test_other_calls_see_job_active_as_it_is() -> None:
    peer = Peer(busy=1)
    with pytest.raises(JobActive):
        _retrying(peer, until_s=5.0, while_active=False)
    assert peer.calls == 1
