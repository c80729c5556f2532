"""MigrateMany without daemons: srcd's request checks and run order (srcd/evacuate.py), and
migctl's end of the stream (migctl/evacstream.py) against a fake call: the same progress,
summary and exit status as the per-domain path, a broken stream reported per domain, and
Ctrl-C sent as stop / abort_live."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import grpc
import grpc.aio
import pytest
from vmmigrate.common import errors
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.migctl import evacstream
from vmmigrate.migctl import evacuate as ev
from vmmigrate.srcd import evacuate as sev

from vmmigrate.v1 import vmmigrate_pb2 as pb

F = MigrateFlag


# --- srcd: the request ----------------------------------------------------------------------

def _start(**kw: Any) -> pb.MigrateManyStart:
    base: dict[str, Any] = {"dest_uri": "h:1", "parallel": 4, "flags": int(F.PEER2PEER)}
    base.update(kw)
    return pb.MigrateManyStart(**base)


def test_request_checked() -> None:
    r = sev.Request.from_pb(_start(domains=["a", "b", "a"], selection=pb.SELECT_OFFLINE))
    assert r.domains == ("a", "b") and r.selection is ev.Selection.OFFLINE
    assert r.flags == F.PEER2PEER and r.parallel == 4
    for bad, text in [
        (_start(dest_uri=""), "missing destination URI"),
        (_start(parallel=0), "evacuate: Invalid parallel count"),
        (_start(parallel=sev.MAX_PARALLEL + 1), "evacuate: Invalid parallel count"),
        (_start(flags=int(F.OFFLINE)), "chooses live or offline per domain itself"),
        (_start(domains=[""]), "missing domain name"),
        (_start(selection=7), "unknown evacuation selection 7"),
    ]:
        with pytest.raises(errors.InvalidArgument, match=text):
            sev.Request.from_pb(bad)


# --- srcd: the run --------------------------------------------------------------------------

class _Ctx:
    class config:
        max_outgoing = 64


def _run(targets: list[sev.Target], parallel: int, fail: dict[str, errors.VmmigrateError],
         hold: float = 0.01) -> tuple[list[pb.MigrateManyResult], list[str], int, int]:
    run = sev.Evacuation.__new__(sev.Evacuation)
    run.ctx = _Ctx()  # type: ignore[assignment]
    run.request = sev.Request("h:1", F.PEER2PEER, None, ev.Selection.ALL, (), parallel)  # type: ignore[arg-type]
    run.stopped = None
    run.live = set()
    run._results, run._started, run._started_live = [], 0, 0
    run._changed = asyncio.Event()
    run._done = False
    order: list[str] = []
    in_flight = {"now": 0, "live": 0, "most": 0, "most_live": 0}

    async def migrate(t: sev.Target) -> pb.MigrateManyResult:
        order.append(t.name)
        in_flight["now"] += 1
        in_flight["live"] += t.active
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        in_flight["most_live"] = max(in_flight["most_live"], in_flight["live"])
        await asyncio.sleep(hold)
        in_flight["now"] -= 1
        in_flight["live"] -= t.active
        kind = "live" if t.active else "offline"
        if t.name in fail:
            return pb.MigrateManyResult(domain=t.name, kind=kind, migration_id="m",
                                        error=sev.item_status(fail[t.name]))
        return pb.MigrateManyResult(domain=t.name, kind=kind, migration_id="m")

    run._migrate = migrate  # type: ignore[method-assign]

    async def go() -> list[pb.MigrateManyResult]:
        got: list[pb.MigrateManyResult] = []
        task = asyncio.ensure_future(run.run(targets))
        async for msg in run.progress(pb.MigrateManyProgress(total=len(targets))):
            got += msg.results
        await task
        return got

    return asyncio.run(go()), order, in_flight["most"], in_flight["most_live"]


def _targets(n_run: int, n_off: int) -> list[sev.Target]:
    run = [sev.Target(f"run-{i}", f"u-r{i}", True) for i in range(n_run)]
    return run + [sev.Target(f"off-{i:03d}", f"u-o{i}", False) for i in range(n_off)]


def test_live_bounded_by_parallel_offline_many_in_flight() -> None:
    results, order, most, most_live = _run(_targets(6, 200), 2, {})
    assert len(results) == 206 and not any(r.HasField("error") for r in results)
    assert order[:2] == ["run-0", "run-1"]  # running ones first, in order
    assert most_live == 2  # --parallel bounds the live ones
    assert most > 32  # inactive ones go many at once (their calls batch)
    assert most <= 2 * (sev.OFFLINE_WINDOW // 2)


def test_an_error_that_stops_the_run() -> None:
    fail = {"off-000": errors.PeerUnavailable("unable to connect to destination 'h:1'")}
    results, _, _, _ = _run(_targets(0, 300), 1, fail, hold=0.02)
    by_name = {r.domain: r for r in results}
    assert len(by_name) == 300
    stopped = [r for r in results if not r.migration_id]
    assert stopped  # those not started end with the reason, never started
    assert all(r.error.message.startswith("evacuation stopped by an earlier error: ")
               for r in stopped)
    assert "unable to connect" in stopped[0].error.message
    assert stopped[0].error.error_class == "OperationAborted"


# --- migctl: the stream ---------------------------------------------------------------------

class _Call:
    """A MigrateMany call: answers ``messages``, then ends with ``error`` (if any)."""

    def __init__(self, messages: list[pb.MigrateManyProgress],
                 error: grpc.StatusCode | None = None) -> None:
        self.messages = messages
        self.error = error
        self.written: list[pb.MigrateManyRequest] = []

    async def write(self, msg: pb.MigrateManyRequest) -> None:
        self.written.append(msg)

    def __aiter__(self) -> Any:
        return self._gen()

    async def _gen(self) -> Any:
        for m in self.messages:
            yield m
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "connection reset")

    def cancel(self) -> None:
        pass


class _Dom:
    def __init__(self, call: _Call, names: list[str]) -> None:
        self.call = call
        self.names = names
        self.timeout = 0.0

    def MigrateMany(self, timeout: float) -> _Call:
        self.timeout = timeout
        return self.call

    async def List(self, request: pb.ListRequest) -> pb.ListResponse:
        return pb.ListResponse(domains=[pb.ListEntry(domain=pb.DomainRef(name=n, uuid=n),
                                                     state=pb.DOMAIN_STATE_SHUTOFF)
                                        for n in self.names])


class _Session:
    def __init__(self, dom: _Dom) -> None:
        self.dom = dom
        self.address = "127.0.0.1:7301"

    async def rpc(self, method: Any, request: Any, timeout: float = 30.0) -> Any:
        return await method(request)


# what srcd sends for the error its migration ended with
EXISTS = sev.item_status(errors.DomainExists("domain 'c' already exists with uuid 1234"))


def _evacuate(call: _Call, names: list[str], *argv: str) -> tuple[int, str, _Dom]:
    from vmmigrate.migctl import main as migctl

    a = migctl._build_parser().parse_args(["evacuate", *argv, "hostb:7302"])
    dom = _Dom(call, names)
    out = io.StringIO()
    status = asyncio.run(ev.evacuate(a, _Session(dom), "hostb:7302", 600.0, out))
    return status, out.getvalue(), dom


def test_stream_results_printed_as_the_per_domain_path_prints_them() -> None:
    call = _Call([
        pb.MigrateManyProgress(total=3, started=2),
        pb.MigrateManyProgress(results=[
            pb.MigrateManyResult(domain="a", kind="offline", migration_id="1"),
            pb.MigrateManyResult(domain="c", kind="offline", migration_id="2", error=EXISTS),
        ], started=1),
        pb.MigrateManyProgress(results=[
            pb.MigrateManyResult(domain="b", kind="offline", migration_id="3")]),
    ])
    status, out, dom = _evacuate(call, ["a", "b", "c"], "--parallel", "16")
    assert status == 1
    assert out.splitlines() == [
        "a: moved (offline)",
        "c: not moved: operation failed: domain 'c' already exists with uuid 1234",
        "b: moved (offline)",
        "Evacuation to hostb:7302: 2 moved, 1 not moved",
        "Moved (2):",
        "  a (offline)",
        "  b (offline)",
        "Not moved (1):",
        "  c: operation failed: domain 'c' already exists with uuid 1234",
    ]
    start = call.written[0].start
    assert (start.dest_uri, start.parallel, start.selection) == ("hostb:7302", 16, pb.SELECT_ALL)
    assert start.flags == int(F.PEER2PEER)
    assert dom.timeout == 600.0  # one round of 16


def test_a_broken_stream_reports_every_domain_not_heard_of() -> None:
    call = _Call([pb.MigrateManyProgress(total=3, started=1, results=[
        pb.MigrateManyResult(domain="a", kind="offline", migration_id="1")])],
        error=grpc.StatusCode.UNAVAILABLE)
    status, out, _ = _evacuate(call, ["a", "b", "c"], "--offline")
    assert status == 1
    assert "Evacuation to hostb:7302: 1 moved, 2 not moved" in out
    assert sum("unable to connect to daemon '127.0.0.1:7301'" in line
               for line in out.splitlines() if line.startswith("  ")) == 2


def test_unimplemented_falls_back_to_one_migrate_per_domain() -> None:
    with pytest.raises(evacstream.Unimplemented):
        asyncio.run(evacstream.StreamEvacuation(
            _Session(_Dom(_Call([], grpc.StatusCode.UNIMPLEMENTED), [])),
            pb.MigrateManyStart(), 1.0).run(ev.Progress(io.StringIO(), 0, False), ev.Outcome, []))


def test_deadline_grows_with_the_rounds() -> None:
    assert evacstream.stream_deadline(600.0, 0, 4) == 600.0
    assert evacstream.stream_deadline(600.0, 9, 4) == 1800.0
