"""The v3 coordinator's failure matrix, once, as a table: fake sides record the phases
called, the cancelled flags passed to Finish and Confirm, and the error reported."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from vmmigrate.common.coordinator import (
    AskFinish,
    Begun,
    Coordinator,
    Finished,
    Prepared,
    destination_flags,
)
from vmmigrate.common.errors import OperationFailed, PeerUnavailable, Timeout, VmmigrateError
from vmmigrate.common.flags import MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb

LIVE = MigrateFlag.LIVE | MigrateFlag.AUTO_CONVERGE | MigrateFlag.CHANGE_PROTECTION
OFFLINE = MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST
DOMAIN = pb.DomainRef(name="vm", uuid="u", id=1)
NO_DOMAIN = "no domain"  # Finish answers without a domain


@dataclasses.dataclass
class Script:
    """Which step fails, and with what."""

    flags: MigrateFlag = LIVE
    ends_job: bool = False  # client-driven: a failed Perform ended the source job
    unknown_is_error: bool = True  # the source side reports a lost Finish itself
    fail: dict[str, object] = dataclasses.field(default_factory=dict)


class Fakes:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[str] = []
        self.asked: AskFinish | None = None
        self.perform_ends_job_on_failure = script.ends_job

    async def _step(self, name: str) -> None:
        self.calls.append(name)
        failure = self.script.fail.get(name)
        if isinstance(failure, BaseException):
            raise failure

    # the source side
    async def begin(self) -> Begun:
        await self._step("begin")
        return Begun(b"begin-cookie", "<domain/>", self.script.flags, "vm")

    async def abandon(self) -> None:
        self.calls.append("abandon")

    async def after_prepare(self, prepared: Prepared) -> None:
        await self._step("after_prepare")

    async def perform(self, prepared: Prepared) -> bytes:
        assert prepared == Prepared(b"prepare-cookie", "tcp:h:1")
        await self._step("perform")
        return b"perform-cookie"

    def finish_unknown(self, exc: VmmigrateError, ask: AskFinish) -> VmmigrateError | None:
        self.calls.append("finish_unknown")
        self.asked = ask
        return OperationFailed(f"lost: {exc}") if self.script.unknown_is_error else None

    async def after_finish(self) -> None:
        await self._step("after_finish")

    async def confirm(self, cancelled: bool, cookie: bytes) -> None:
        self.calls.append(f"confirm({cancelled}, {cookie.decode()})")

    # the destination side
    async def check(self, flags: MigrateFlag) -> None:
        await self._step("check")

    async def prepare(self, begun: Begun, flags: MigrateFlag) -> Prepared:
        assert flags == destination_flags(self.script.flags)
        await self._step("prepare")
        return Prepared(b"prepare-cookie", "tcp:h:1")

    async def prepare_failed(self, exc: BaseException, flags: MigrateFlag) -> None:
        self.calls.append("prepare_failed")

    async def finish(self, flags: MigrateFlag, cookie: bytes, cancelled: bool) -> Finished:
        self.calls.append(f"finish({cancelled}, {cookie.decode()})")
        failure = self.script.fail.get("finish")
        if isinstance(failure, BaseException):
            raise failure
        if failure == NO_DOMAIN:
            return Finished(None)
        return Finished(DOMAIN, b"finish-cookie")

    def finish_failed(self, flags: MigrateFlag) -> None:
        self.calls.append("finish_failed")


def _run(script: Script) -> tuple[Fakes, pb.DomainRef | BaseException, list[str]]:
    fakes = Fakes(script)
    coordinator = Coordinator(fakes, fakes, script.flags)
    try:
        result: pb.DomainRef | BaseException = asyncio.run(coordinator.run())
    except VmmigrateError as exc:
        result = exc
    return fakes, result, coordinator.phases


E_CHECK = OperationFailed("check")
E_BEGIN = OperationFailed("begin")
E_PREPARE = OperationFailed("prepare")
E_LOST_PREPARE = PeerUnavailable("prepare unreachable")
E_AFTER_PREPARE = OperationFailed("after prepare")
E_PERFORM = OperationFailed("perform")
E_LOST = Timeout("finish unanswered")
E_FINISH = OperationFailed("finish")
E_AFTER_FINISH = OperationFailed("after finish")
OK = "ok"
HEAD = ["check", "begin", "prepare", "after_prepare"]

MATRIX: list[tuple[str, Script, list[str], object]] = [
    # name, script -> calls, error (or OK: the domain)
    ("live ok", Script(), [*HEAD, "perform", "finish(False, perform-cookie)", "after_finish",
                           "confirm(False, finish-cookie)"], OK),
    ("offline ok: no perform, no cookie", Script(flags=OFFLINE),
     [*HEAD, "finish(False, )", "after_finish", "confirm(False, finish-cookie)"], OK),
    ("capabilities refused", Script(fail={"check": E_CHECK}), ["check"], E_CHECK),
    ("begin fails", Script(fail={"begin": E_BEGIN}), ["check", "begin"], E_BEGIN),
    ("prepare fails: abandon, no finish, no confirm", Script(fail={"prepare": E_PREPARE}),
     ["check", "begin", "prepare", "abandon", "prepare_failed"], E_PREPARE),
    ("prepare lost", Script(fail={"prepare": E_LOST_PREPARE}),
     ["check", "begin", "prepare", "abandon", "prepare_failed"], E_LOST_PREPARE),
    ("after prepare fails: finish and confirm cancelled",
     Script(fail={"after_prepare": E_AFTER_PREPARE}),
     [*HEAD, "finish(True, )", "after_finish", "confirm(False, finish-cookie)"], E_AFTER_PREPARE),
    ("after prepare fails offline", Script(flags=OFFLINE, fail={"after_prepare": E_AFTER_PREPARE,
                                                                "finish": NO_DOMAIN}),
     [*HEAD, "finish(True, )", "after_finish", "confirm(True, )"], E_AFTER_PREPARE),
    ("perform fails (p2p): finish cancelled, confirm cancelled",
     Script(fail={"perform": E_PERFORM, "finish": NO_DOMAIN}),
     [*HEAD, "perform", "finish(True, )", "after_finish", "confirm(True, )"], E_PERFORM),
    ("perform fails (client-driven): finish cancelled, no confirm",
     Script(ends_job=True, fail={"perform": E_PERFORM, "finish": NO_DOMAIN}),
     [*HEAD, "perform", "finish(True, )", "after_finish"], E_PERFORM),
    ("finish lost: the source side reports it, no confirm",
     Script(fail={"finish": E_LOST}),
     [*HEAD, "perform", "finish(False, perform-cookie)", "finish_unknown"], "lost: "),
    ("finish lost, the side goes on (client-driven offline): confirm cancelled",
     Script(flags=OFFLINE, unknown_is_error=False, fail={"finish": E_LOST}),
     [*HEAD, "finish(False, )", "finish_unknown", "after_finish", "confirm(True, )"], E_LOST),
    ("finish lost after a failed perform: nothing unknown, the cancel asked again later",
     Script(fail={"perform": E_PERFORM, "finish": E_LOST}),
     [*HEAD, "perform", "finish(True, )", "finish_failed", "after_finish", "confirm(True, )"],
     E_PERFORM),
    ("finish fails: let go there, confirm cancelled",
     Script(fail={"finish": E_FINISH}),
     [*HEAD, "perform", "finish(False, perform-cookie)", "finish_failed", "after_finish",
      "confirm(True, )"], E_FINISH),
    ("finish fails after a failed perform: the first error",
     Script(fail={"perform": E_PERFORM, "finish": E_FINISH}),
     [*HEAD, "perform", "finish(True, )", "finish_failed", "after_finish", "confirm(True, )"],
     E_PERFORM),
    ("finish returns no domain", Script(fail={"finish": NO_DOMAIN}),
     [*HEAD, "perform", "finish(False, perform-cookie)", "after_finish", "confirm(True, )"],
     "migration failed: the destination did not return a domain"),
    ("after finish fails: reported, Finish's domain still confirmed",
     Script(fail={"after_finish": E_AFTER_FINISH}),
     [*HEAD, "perform", "finish(False, perform-cookie)", "after_finish",
      "confirm(False, finish-cookie)"], E_AFTER_FINISH),
]


@pytest.mark.parametrize(("script", "calls", "error"), [row[1:] for row in MATRIX],
                         ids=[row[0] for row in MATRIX])
def test_failure_matrix(script: Script, calls: list[str], error: object) -> None:
    fakes, result, phases = _run(script)
    assert fakes.calls == calls
    if error == OK:
        assert result == DOMAIN
    elif isinstance(error, str):
        assert isinstance(result, OperationFailed)
        assert str(result).startswith(error)
    else:
        assert result is error
    # the phases the coordinator reports are those it called, in libvirt's order
    expected = [p for p in ("begin", "prepare", "perform", "finish", "confirm")
                if any(c.startswith(p) for c in calls)
                and not (p == "begin" and "begin" in script.fail)]  # Begin did not run
    assert phases == expected


def test_lost_finish_is_asked_again_not_cancelled() -> None:
    fakes, result, _ = _run(Script(fail={"finish": E_LOST}))
    assert isinstance(result, OperationFailed)
    assert result.__cause__ is E_LOST
    assert fakes.asked is not None
    fakes.script.fail.clear()
    assert asyncio.run(fakes.asked()) == Finished(DOMAIN, b"finish-cookie")
    assert fakes.calls[-1] == "finish(False, perform-cookie)"


def test_destination_flags() -> None:
    flags = MigrateFlag.LIVE | MigrateFlag.AUTO_CONVERGE | MigrateFlag.ABORT_ON_ERROR
    assert destination_flags(flags | MigrateFlag.CHANGE_PROTECTION) == MigrateFlag.LIVE


def test_finished_round_trip() -> None:
    assert Finished.from_pb(pb.FinishResponse()) == Finished(None)
    assert Finished.from_pb(Finished(DOMAIN, b"c").to_pb()) == Finished(DOMAIN, b"c")
    assert not Finished(None).to_pb().HasField("domain")
