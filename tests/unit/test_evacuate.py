"""migctl evacuate without daemons: its command line, the per-domain flag policy, the
summary and exit status, the progress output, and the run itself against a source double
(domains that vanish or change state, the concurrency bound, an error that stops the
evacuation, Ctrl-C once and twice)."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from vmmigrate.common import errors
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.migctl import evacuate as ev
from vmmigrate.migctl import main as migctl

from vmmigrate.v1 import vmmigrate_pb2 as pb

RUNNING, PAUSED, SHUTOFF = pb.DOMAIN_STATE_RUNNING, pb.DOMAIN_STATE_PAUSED, pb.DOMAIN_STATE_SHUTOFF
F = MigrateFlag


def _parse(*argv: str) -> argparse.Namespace:
    return migctl._build_parser().parse_args(["evacuate", *argv])


# --- command line --------------------------------------------------------------------------

def test_defaults() -> None:
    a = _parse("hostb")
    assert (a.command, a.desturi, a.parallel, a.domains) == ("evacuate", "hostb", 4, None)
    opts = ev.options(a)
    assert opts.selection is ev.Selection.ALL
    assert opts.flags == F.PEER2PEER  # p2p, as migrate --p2p
    assert opts.parallel == 4
    assert opts.params == pb.MigrationParams()


def test_options_map_to_flags_and_params() -> None:
    a = _parse("--live", "--parallel", "16", "--domain", "vm1", "--domain", "vm2",
               "--tunneled", "--auto-converge", "--unsafe", "--bandwidth", "50",
               "--timeout", "30", "--timeout-suspend", "qemu+tls://hostb/system")
    assert a.domains == ["vm1", "vm2"]
    opts = ev.options(a)
    assert opts.selection is ev.Selection.LIVE and opts.parallel == 16
    assert opts.flags == F.PEER2PEER | F.TUNNELLED | F.AUTO_CONVERGE | F.UNSAFE
    assert opts.params == pb.MigrationParams(bandwidth_mib=50, timeout_s=30,
                                             timeout_suspend=True)
    assert ev.options(_parse("--offline", "b")).selection is ev.Selection.OFFLINE
    # virsh's rule: --timeout alone suspends too
    assert ev.options(_parse("--live", "--timeout", "9", "b")).params.timeout_suspend


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parallel", "0"], "evacuate: Invalid parallel count"),
        (["--offline", "--timeout", "5"], "evacuate: Unexpected timeout for offline migration"),
        (["--timeout", "0"], "evacuate: Invalid timeout"),
        (["--timeout-suspend"], "evacuate: Unexpected --timeout-* option without --timeout"),
        (["--bandwidth", "-1"], "evacuate: Invalid bandwidth"),
        (["--offline", "--tunnelled"], "evacuate: tunnelled offline migration does not make sense"),
    ],
)
def test_refused_before_any_call(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ev.EvacuateUsageError) as info:
        ev.options(_parse(*argv, "hostb"))
    assert str(info.value) == message
    # through main, with a srcd address where nothing listens: refused before any call
    with pytest.raises(SystemExit) as code:
        migctl.main(["-c", "127.0.0.1:1", "evacuate", *argv, "hostb"])
    assert code.value.code == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_live_and_offline_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as code:
        migctl.main(["evacuate", "--live", "--offline", "hostb"])
    assert code.value.code == 1
    assert "not allowed with argument" in capsys.readouterr().err


def test_bad_desturi_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as code:
        migctl.main(["-c", "127.0.0.1:1", "evacuate", "qemu+ssh://b/system"])
    assert code.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid argument: destination URI 'qemu+ssh://b/system'")


def test_help_page_and_group() -> None:
    text = migctl.helptext.command_page(migctl._build_parser(), "evacuate")
    assert "    evacuate - migrate every domain of this host to another host" in text
    assert "--parallel <number>" in text and "--domain <string>" in text
    assert "running and paused ones live, inactive ones offline" in " ".join(text.split())
    assert "    evacuate " in migctl.helptext.overview(migctl._build_parser(), "domain")


# --- the per-domain policy -----------------------------------------------------------------

P2P = F.PEER2PEER
MOVE_DEFS = F.PERSIST_DEST | F.UNDEFINE_SOURCE


@pytest.mark.parametrize(
    ("selection", "state", "persistent", "flags"),
    [
        (ev.Selection.ALL, RUNNING, True, P2P | F.LIVE | MOVE_DEFS),
        (ev.Selection.ALL, PAUSED, True, P2P | F.LIVE | MOVE_DEFS),  # Begin adds PAUSED
        (ev.Selection.ALL, SHUTOFF, True, P2P | F.OFFLINE | MOVE_DEFS),  # 0x41a
        (ev.Selection.ALL, RUNNING, False, P2P | F.LIVE),  # transient stays transient
        (ev.Selection.LIVE, RUNNING, True, P2P | F.LIVE | MOVE_DEFS),
        (ev.Selection.OFFLINE, SHUTOFF, True, P2P | F.OFFLINE | MOVE_DEFS),
    ],
)
def test_domain_flags(selection: ev.Selection, state: Any, persistent: bool,
                      flags: MigrateFlag) -> None:
    assert ev.domain_flags(selection, state, persistent, P2P) == flags


def test_offline_ones_drop_what_only_a_stream_uses() -> None:
    base = P2P | F.TUNNELLED | F.AUTO_CONVERGE | F.UNSAFE
    assert ev.domain_flags(ev.Selection.ALL, SHUTOFF, True, base) == P2P | F.OFFLINE | MOVE_DEFS
    assert int(ev.domain_flags(ev.Selection.ALL, SHUTOFF, True, base)) == 0x41A
    assert ev.domain_flags(ev.Selection.ALL, RUNNING, True, base) == base | F.LIVE | MOVE_DEFS


def test_selection_leaves_the_others_with_a_reason() -> None:
    with pytest.raises(errors.OperationInvalid, match=r"^domain is not running$"):
        ev.domain_flags(ev.Selection.LIVE, SHUTOFF, True, P2P)
    for state in (RUNNING, PAUSED):
        with pytest.raises(errors.OperationInvalid, match="evacuate --offline moves inactive"):
            ev.domain_flags(ev.Selection.OFFLINE, state, True, P2P)


# --- summary, exit status, progress --------------------------------------------------------

EXISTS = errors.DomainExists("domain 'c' already exists with uuid 1234")


def test_summary_and_exit_status() -> None:
    outcomes = [ev.Outcome("b", "offline"), ev.Outcome("c", "offline", EXISTS),
                ev.Outcome("a", "live")]
    assert ev.summary(outcomes, "hostb:7302") == [
        "Evacuation to hostb:7302: 2 moved, 1 not moved",
        "Moved (2):",
        "  a (live)",
        "  b (offline)",
        "Not moved (1):",
        "  c: operation failed: domain 'c' already exists with uuid 1234",
    ]
    assert ev.exit_status(outcomes) == 1
    assert ev.exit_status(outcomes[:1]) == 0
    assert ev.exit_status([]) == 0
    assert ev.summary([], "h:1") == ["Evacuation to h:1: 0 moved, 0 not moved"]


def test_progress_not_a_tty_one_line_per_domain() -> None:
    out = io.StringIO()
    p = ev.Progress(out, 2, tty=False)
    p.started()
    p.started()
    p.ended(ev.Outcome("a", "live"), True)
    p.ended(ev.Outcome("c", "offline", EXISTS), True)
    p.close()
    assert out.getvalue() == (
        "a: moved (live)\n"
        "c: not moved: operation failed: domain 'c' already exists with uuid 1234\n"
    )
    assert p.line() == "evacuate: 1/2 moved, 1 not moved, 0 running"


def test_progress_on_a_tty_one_line_rewritten() -> None:
    out = io.StringIO()
    p = ev.Progress(out, 3, tty=True)
    p.started()
    p.ended(ev.Outcome("a", "live"), True)
    p.close()
    text = out.getvalue()
    assert "\n" not in text[:-1] and text.endswith("\n")
    shown = [chunk.removesuffix("\033[K") for chunk in text.rstrip("\n").split("\r")[1:]]
    assert shown == [
        "evacuate: 0/3 moved, 0 not moved, 1 running",
        "evacuate: 1/3 moved, 0 not moved, 0 running",
        "evacuate: 1/3 moved, 0 not moved, 0 running",
    ]


# --- the run, against a source double --------------------------------------------------------

@dataclass
class Dom:
    name: str
    uuid: str
    state: Any = SHUTOFF
    persistent: bool = True


@dataclass
class Source:
    """srcd's DomainService as the evacuation uses it: List, GetInfo, Migrate, AbortJob.
    A Migrate takes ``hold`` seconds (or waits for ``gate``), moves the domain away, or
    raises what ``fail`` says for it; ``before_migrate`` runs first (a domain changing)."""

    domains: dict[str, Dom]
    hold: float = 0.0
    gate: asyncio.Event | None = None
    fail: dict[str, errors.VmmigrateError] = field(default_factory=dict)
    before_migrate: Callable[[Dom], None] | None = None
    running: int = 0
    most: int = 0
    migrations: list[tuple[str, int]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    wait_for: int = 1  # ``started`` is set once this many migrations began
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def find(self, key: str) -> Dom:
        for d in self.domains.values():
            if key in (d.name, d.uuid):
                return d
        raise errors.NoDomain(f"no domain with matching name '{key}'")

    async def List(self, request: pb.ListRequest) -> pb.ListResponse:
        return pb.ListResponse(domains=[
            pb.ListEntry(domain=pb.DomainRef(name=d.name, uuid=d.uuid), state=d.state)
            for d in sorted(self.domains.values(), key=lambda d: d.name)
        ])

    async def GetInfo(self, request: pb.DomainRequest) -> pb.InfoResponse:
        d = self.find(request.domain)
        return pb.InfoResponse(domain=pb.DomainRef(name=d.name, uuid=d.uuid), state=d.state,
                               persistent=d.persistent)

    async def Migrate(self, request: pb.MigrateRequest) -> pb.MigrateResponse:
        d = self.find(request.domain)
        if self.before_migrate:
            self.before_migrate(d)
        self.migrations.append((d.name, request.flags))
        if len(self.migrations) >= self.wait_for:
            self.started.set()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.hold)
            if d.uuid in self.aborted:
                raise errors.OperationAborted("job 'migration out' canceled by client")
            if d.name in self.fail:
                raise self.fail[d.name]
            if request.flags & F.OFFLINE and d.state != SHUTOFF:
                return pb.MigrateResponse()  # a running source is never touched
            del self.domains[d.uuid]
            return pb.MigrateResponse()
        finally:
            self.running -= 1

    async def AbortJob(self, request: pb.AbortJobRequest) -> pb.DomainResponse:
        self.aborted.append(request.domain)
        return pb.DomainResponse()

    def MigrateMany(self, timeout: float) -> Any:
        """An older srcd: no MigrateMany, so migctl falls back to one Migrate per domain
        (these tests are that path's; tests/unit/test_evacstream.py has the stream's)."""
        return _Unimplemented()


class _Unimplemented:
    async def write(self, msg: Any) -> None:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "Method not found!")

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


class Session:
    """main's _Session over the double: rpc(method, request, timeout)."""

    def __init__(self, source: Source) -> None:
        self.dom = source
        self.address = "127.0.0.1:7301"
        self.timeouts: list[float] = []

    async def rpc(self, method: Any, request: Any, timeout: float = 30.0) -> Any:
        self.timeouts.append(timeout)
        return await method(request)


def _source(n_off: int, n_run: int = 0, **kw: Any) -> Source:
    doms = [Dom(f"off-{i:02d}", f"u-off-{i:02d}") for i in range(n_off)]
    doms += [Dom(f"run-{i:02d}", f"u-run-{i:02d}", RUNNING) for i in range(n_run)]
    return Source({d.uuid: d for d in doms}, **kw)


def _run(source: Source, *argv: str, timeout: float = 600.0,
         during: Callable[[], Any] | None = None) -> tuple[int, str, Session]:
    a = _parse(*argv, "hostb:7302")
    s = Session(source)
    out = io.StringIO()

    async def scenario() -> int:
        task = asyncio.ensure_future(ev.evacuate(a, s, "hostb:7302", timeout, out))
        if during is not None:
            await during()
        return await task

    return asyncio.run(scenario()), out.getvalue(), s


def test_everything_moves_running_ones_first_within_the_bound() -> None:
    source = _source(10, 3, hold=0.01)
    status, out, s = _run(source, "--parallel", "4")
    assert status == 0
    assert source.domains == {}
    assert source.most == 4  # never more than --parallel at once
    assert [n for n, _ in source.migrations[:3]] == ["run-00", "run-01", "run-02"]
    flags = dict(source.migrations)
    assert flags["run-00"] == int(P2P | F.LIVE | MOVE_DEFS)
    assert flags["off-00"] == 0x41A
    assert "Evacuation to hostb:7302: 13 moved, 0 not moved" in out
    assert out.count(": moved (offline)\n") == 10 and out.count(": moved (live)\n") == 3
    assert 600.0 in s.timeouts  # each Migrate gets the migration's deadline
    assert all(t > 0 for t in s.timeouts)  # and every call one


def test_domain_selects_and_unknown_names_are_reported() -> None:
    source = _source(5)
    status, out, _ = _run(source, "--domain", "off-01", "--domain", "u-off-01",
                          "--domain", "off-03", "--domain", "ghost")
    assert status == 1
    assert sorted(d.name for d in source.domains.values()) == ["off-00", "off-02", "off-04"]
    assert [n for n, _ in source.migrations] == ["off-01", "off-03"]  # each once
    assert "ghost: not moved: Domain not found: no domain with matching name 'ghost'" in out
    assert "Evacuation to hostb:7302: 2 moved, 1 not moved" in out


def test_vanished_and_changed_domains_are_reported() -> None:
    source = _source(3, 1)
    source.gate = asyncio.Event()

    async def during() -> None:
        # while off-00 moves, off-01 is undefined and off-02 started
        await source.started.wait()
        del source.domains["u-off-01"]
        source.domains["u-off-02"].state = RUNNING
        source.gate.set()  # type: ignore[union-attr]

    status, out, _ = _run(source, "--offline", "--parallel", "1", during=during)
    assert status == 1
    assert [n for n, _ in source.migrations] == ["off-00"]
    lines = out.splitlines()
    running = ("not moved: Requested operation is not valid: domain is running: evacuate "
               "--offline moves inactive domains")
    assert lines[:4] == [
        f"run-00: {running}",
        "off-00: moved (offline)",
        "off-01: not moved: Domain not found: no domain with matching name 'u-off-01'",
        f"off-02: {running}",
    ]
    assert "1 moved, 3 not moved" in out


def test_started_during_its_offline_migration_is_not_counted_moved() -> None:
    source = _source(2)
    source.before_migrate = lambda d: setattr(d, "state", RUNNING) if d.name == "off-00" else None
    status, out, _ = _run(source)
    assert status == 1
    assert ("off-00: not moved: Requested operation is not valid: domain was started here "
            "during its offline migration") in out
    assert "off-01: moved (offline)" in out


def test_live_only_reports_the_inactive_ones() -> None:
    source = _source(2, 1)
    status, out, _ = _run(source, "--live")
    assert status == 1
    assert [n for n, _ in source.migrations] == ["run-00"]
    assert "off-00: not moved: Requested operation is not valid: domain is not running" in out


def test_a_host_level_error_stops_the_evacuation() -> None:
    source = _source(6, hold=0.01)
    same = errors.SameHost("Attempt to migrate guest to the same host 1234")
    source.fail = {f"off-{i:02d}": same for i in range(6)}
    status, out, _ = _run(source, "--parallel", "1")
    assert status == 1
    assert len(source.migrations) == 1  # the others never started
    assert "off-00: not moved: internal error: Attempt to migrate guest to the same host" in out
    assert ("off-05: not moved: operation aborted: evacuation stopped by an earlier error: "
            "internal error: Attempt to migrate guest to the same host 1234") in out
    assert "0 moved, 6 not moved" in out


def test_a_domain_level_error_does_not_stop_it() -> None:
    source = _source(4)
    source.fail = {"off-01": EXISTS}
    status, out, _ = _run(source, "--parallel", "1")
    assert status == 1
    assert len(source.migrations) == 4
    assert "3 moved, 1 not moved" in out


def test_ctrl_c_once_finishes_the_running_twice_aborts_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for presses in (1, 2):
        source = _source(4, 2, gate=asyncio.Event(), wait_for=2)

        async def during(source: Source = source, presses: int = presses) -> None:
            await source.started.wait()
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)  # the real signal, as from the terminal
                await asyncio.sleep(0.05)
            source.gate.set()  # type: ignore[union-attr]

        status, out, _ = _run(source, "--parallel", "2", during=during)
        assert status == 1
        assert [n for n, _ in source.migrations] == ["run-00", "run-01"]  # none started after
        err = capsys.readouterr().err
        assert "migctl: interrupted: no new migration starts; waiting for the 2 running" in err
        for i in range(4):  # never started: in the summary with the reason
            assert (f"  off-{i:02d}: operation aborted: evacuation interrupted before this "
                    "domain's turn\n") in out
        if presses == 1:
            assert "run-00: moved (live)" in out and "run-01: moved (live)" in out
            assert source.aborted == []
        else:
            assert "migctl: aborting 2 live migration(s)" in err
            assert sorted(source.aborted) == ["u-run-00", "u-run-01"]
            assert "run-00: not moved: operation aborted: job 'migration out' canceled" in out
        assert err.rstrip().endswith("error: Failed to evacuate 4 of 6 domain(s)"
                                     if presses == 1 else
                                     "error: Failed to evacuate 6 of 6 domain(s)")
    # the handler is gone afterwards: Ctrl-C is Python's again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_to_move() -> None:
    status, out, _ = _run(_source(0))
    assert status == 0
    assert out == "Evacuation to hostb:7302: 0 moved, 0 not moved\n"
