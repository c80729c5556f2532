"""migctl event's ends without a daemon: Ctrl-C (virsh's "event loop interrupted"), the
first event without --loop, --timeout, a stream that fails; and virsh's exit status (0 only
when an event arrived). The stream is a fake; the SIGINT is the real signal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from vmmigrate.common import errors
from vmmigrate.migctl import main as migctl
from vmmigrate.migctl import observe

from vmmigrate.v1 import vmmigrate_pb2 as pb

ADDRESS = "127.0.0.1:7301"


def _event(domain: str, event: str, detail: str) -> pb.DomainEvent:
    return pb.DomainEvent(domain=domain, uuid=f"u-{domain}", event=event, detail=detail,
                          time_unix=1.5, daemon="srcd")


class FakeStream:
    """A server stream: its events, then ``then`` ("sigint", "fail" or "end"), then (unless
    it ended or failed) nothing more until cancelled."""

    def __init__(self, events: list[pb.DomainEvent], then: str) -> None:
        self.events = events
        self.then = then
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[pb.DomainEvent]:
        return self._follow()

    async def _follow(self) -> AsyncIterator[pb.DomainEvent]:
        for ev in self.events:
            yield ev
        if self.then == "end":
            return
        if self.then == "fail":
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                "Socket closed", None)
        if self.then == "sigint":
            os.kill(os.getpid(), signal.SIGINT)  # as from the terminal
        await asyncio.Event().wait()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeSession:
    def __init__(self, stream: FakeStream) -> None:
        self.address = ADDRESS
        self.stream = stream
        self.requests: list[pb.EventsRequest] = []
        self.dom = self

    def Events(self, request: pb.EventsRequest) -> FakeStream:
        self.requests.append(request)
        return self.stream


def _run(stream: FakeStream, *args: str) -> tuple[int, FakeSession]:
    a = migctl._build_parser().parse_args(["event", *args])
    s = FakeSession(stream)
    status = asyncio.run(observe.cmd_event(a, s))
    return status, s


EVENTS = [_event("vm1", "Defined", "Added"), _event("vm1", "Started", "Booted")]
LINES = ["event 'lifecycle' for domain 'vm1': Defined Added",
         "event 'lifecycle' for domain 'vm1': Started Booted"]


def test_ctrl_c_ends_the_loop_with_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    status, s = _run(FakeStream(EVENTS, "sigint"), "--loop", "--timeout", "120", "--domain", "vm1")
    assert capsys.readouterr().out.splitlines() == [
        *LINES, "event loop interrupted", "events received: 2"]
    assert status == 0
    assert s.stream.cancelled
    assert [r.domain for r in s.requests] == ["vm1"]
    # the handler is gone afterwards: Ctrl-C is Python's again (the rest of migctl)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_before_any_event_is_a_failure_without_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _ = _run(FakeStream([], "sigint"), "--loop")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["event loop interrupted", "events received: 0"]
    assert (status, err) == (1, "")


def test_ctrl_c_with_json_prints_the_events_only(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = _run(FakeStream(EVENTS, "sigint"), "--loop", "--json")
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["domain"], d["event"], d["detail"], d["daemon"]) for d in docs] == [
        ("vm1", "Defined", "Added", "srcd"), ("vm1", "Started", "Booted", "srcd")]
    assert status == 0


def test_without_loop_the_first_event_ends_it(capsys: pytest.CaptureFixture[str]) -> None:
    status, s = _run(FakeStream(EVENTS, "sigint"), "--timeout", "120")
    assert capsys.readouterr().out.splitlines() == [LINES[0], "events received: 1"]
    assert status == 0 and s.stream.cancelled


def test_a_stream_that_ends_ends_the_loop(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = _run(FakeStream(EVENTS, "end"), "--loop")
    assert capsys.readouterr().out.splitlines() == [*LINES, "events received: 2"]
    assert status == 0


def test_a_failed_stream_is_an_error_and_restores_ctrl_c() -> None:
    with pytest.raises(errors.PeerUnavailable, match="unable to connect to daemon"):
        _run(FakeStream(EVENTS[:1], "fail"), "--loop")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_timeout_and_interrupt_are_told_apart() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def interrupt_soon() -> observe.LoopEnd:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)
        return await observe.until_end(forever(), None)

    assert asyncio.run(observe.until_end(forever(), 0.01)) is observe.LoopEnd.TIMEOUT
    assert asyncio.run(interrupt_soon()) is observe.LoopEnd.INTERRUPT


@pytest.mark.parametrize("value", ["0", "-1"])
def test_invalid_timeout_is_refused_before_any_call(value: str) -> None:
    s = FakeSession(FakeStream([], "end"))
    a = migctl._build_parser().parse_args(["event", "--timeout", value])
    with pytest.raises(errors.InvalidArgument, match="event: Invalid timeout"):
        asyncio.run(observe.cmd_event(a, s))
    assert s.requests == []
