"""Flag values and validation (libvirt's texts, in libvirt's order) and the phase enum."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from vmmigrate.common.errors import (
    ArgumentUnsupported,
    JobActive,
    OperationInvalid,
    UnsupportedFlags,
)
from vmmigrate.common.flags import (
    ALL_FLAGS,
    MigrateFlag,
    check_begin_flags,
    check_prepare_flags,
    flag_names,
    parse_flags,
)
from vmmigrate.common.phase import TRANSITIONS, Phase, advance, check_phase_transition, require

F = MigrateFlag


def test_libvirt_values() -> None:
    expected = {
        "LIVE": 0x1, "PEER2PEER": 0x2, "TUNNELLED": 0x4, "PERSIST_DEST": 0x8,
        "UNDEFINE_SOURCE": 0x10, "PAUSED": 0x20, "NON_SHARED_DISK": 0x40,
        "NON_SHARED_INC": 0x80, "CHANGE_PROTECTION": 0x100, "UNSAFE": 0x200,
        "OFFLINE": 0x400, "COMPRESSED": 0x800, "ABORT_ON_ERROR": 0x1000,
        "AUTO_CONVERGE": 0x2000, "RDMA_PIN_ALL": 0x4000, "POSTCOPY": 0x8000, "TLS": 0x10000,
        "PARALLEL": 0x20000, "NON_SHARED_SYNCHRONOUS_WRITES": 0x40000,
        "POSTCOPY_RESUME": 0x80000, "ZEROCOPY": 0x100000,
    }
    assert {f.name: f.value for f in MigrateFlag} == expected
    assert int(ALL_FLAGS) == 0x1FFFFF
    assert int(F.OFFLINE | F.PERSIST_DEST | F.PEER2PEER) == 0x40A
    assert int(F.OFFLINE | F.PERSIST_DEST | F.PEER2PEER | F.UNDEFINE_SOURCE) == 0x41A


@pytest.mark.parametrize("value", [1 << 21, 1 << 40, 0x41A | 1 << 30])
def test_unknown_bits_are_refused(value: int) -> None:
    with pytest.raises(UnsupportedFlags) as err:
        parse_flags(value, "prepare")
    assert str(err.value) == f"unsupported flags (0x{value & ~0x1FFFFF:x}) in function prepare"


def test_negative_flags_refused() -> None:
    with pytest.raises(UnsupportedFlags):
        parse_flags(-1, "begin")


BEGIN_TABLE = [
    (F.OFFLINE | F.PERSIST_DEST | F.PEER2PEER, None),
    (F.OFFLINE | F.PERSIST_DEST, None),
    (F.OFFLINE | F.PERSIST_DEST | F.UNDEFINE_SOURCE | F.PEER2PEER, None),
    (F.OFFLINE, "offline migration must be specified with the persistent flag set"),
    (F.OFFLINE | F.NON_SHARED_DISK, "offline migration cannot handle non-shared storage"),
    (F.OFFLINE | F.PERSIST_DEST | F.NON_SHARED_INC,
     "offline migration cannot handle non-shared storage"),
    (F.OFFLINE | F.PERSIST_DEST | F.TUNNELLED | F.PEER2PEER,
     "tunnelled offline migration does not make sense"),
    (F.OFFLINE | F.PERSIST_DEST | F.TUNNELLED,
     "cannot perform tunnelled migration without using peer2peer flag"),
    (F.NON_SHARED_DISK | F.NON_SHARED_INC,
     "flags 'NON_SHARED_DISK' and 'NON_SHARED_INC' are mutually exclusive"),
    (F.POSTCOPY, "post-copy migration is not supported with non-live or paused migration"),
    (F.POSTCOPY | F.LIVE | F.PAUSED,
     "post-copy migration is not supported with non-live or paused migration"),
    (F.POSTCOPY | F.LIVE | F.TUNNELLED | F.PEER2PEER,
     "post-copy is not supported with tunnelled migration"),
    (F.OFFLINE | F.POSTCOPY | F.PERSIST_DEST,
     "post-copy migration is not supported with non-live or paused migration"),
    (F.LIVE | F.ZEROCOPY, "zero-copy is only available for parallel migration"),
    (F.LIVE | F.COMPRESSED, "migration flags COMPRESSED are not supported by vmmigrate"),
]


@pytest.mark.parametrize(("flags", "message"), BEGIN_TABLE, ids=[hex(f) for f, _ in BEGIN_TABLE])
def test_begin_validation_table(flags: MigrateFlag, message: str | None) -> None:
    if message is None:
        check_begin_flags(flags)
        return
    with pytest.raises((OperationInvalid, ArgumentUnsupported)) as err:
        check_begin_flags(flags)
    assert str(err.value) == message


PREPARE_TABLE = [
    (F.OFFLINE | F.PERSIST_DEST, None),
    (F.OFFLINE, "offline migration must be specified with the persistent flag set"),
    # Prepare checks the offline trio before post-copy (libvirt's PrepareAny order)
    (F.OFFLINE | F.POSTCOPY, "offline migration must be specified with the persistent flag set"),
    (F.OFFLINE | F.PERSIST_DEST | F.TUNNELLED, "tunnelled offline migration does not make sense"),
    (F.OFFLINE | F.PERSIST_DEST | F.NON_SHARED_DISK | F.TUNNELLED,
     "offline migration cannot handle non-shared storage"),
]


@pytest.mark.parametrize(("flags", "message"), PREPARE_TABLE, ids=[hex(f) for f, _ in PREPARE_TABLE])
def test_prepare_validation_table(flags: MigrateFlag, message: str | None) -> None:
    if message is None:
        check_prepare_flags(flags)
        return
    with pytest.raises(OperationInvalid) as err:
        check_prepare_flags(flags)
    assert str(err.value) == message


def test_flag_names() -> None:
    assert flag_names(F.OFFLINE | F.PERSIST_DEST | F.PEER2PEER) == "PEER2PEER|PERSIST_DEST|OFFLINE"
    assert flag_names(F(0)) == "0"


def test_phase_values_and_labels() -> None:
    assert [(p.value, p.label) for p in Phase] == [
        (0, "none"), (1, "perform2"), (2, "begin3"), (3, "perform3"), (4, "perform3_done"),
        (5, "confirm3_cancelled"), (6, "confirm3"), (7, "prepare"), (8, "finish2"),
        (9, "finish3"),
    ]
    assert Phase.from_label("perform3_done") is Phase.PERFORM3_DONE
    with pytest.raises(ValueError, match="unknown migration phase"):
        Phase.from_label("bogus")


def test_source_phase_order() -> None:
    p = Phase.BEGIN3
    for nxt in (Phase.PERFORM3, Phase.PERFORM3_DONE, Phase.CONFIRM3):
        p = advance(p, nxt)
    assert p is Phase.CONFIRM3
    # offline skips Perform: BEGIN3 -> CONFIRM3 directly is forward
    assert advance(Phase.BEGIN3, Phase.CONFIRM3_CANCELLED) is Phase.CONFIRM3_CANCELLED
    assert advance(Phase.PREPARE, Phase.FINISH3) is Phase.FINISH3


@pytest.mark.parametrize(
    ("old", "new"),
    [(Phase.CONFIRM3, Phase.BEGIN3), (Phase.PERFORM3_DONE, Phase.PERFORM3),
     (Phase.FINISH3, Phase.PREPARE)],
)
def test_phases_never_go_backwards(old: Phase, new: Phase) -> None:
    with pytest.raises(OperationInvalid) as err:
        check_phase_transition(old, new)
    assert str(err.value) == f"migration protocol going backwards {old.label} => {new.label}"


def test_transitions_are_logged() -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        advance(Phase.BEGIN3, Phase.CONFIRM3, migration_id="m1")
    assert logs == [{"event": "phase_advanced", "old": "begin3", "new": "confirm3",
                     "migration_id": "m1", "log_level": "info"}]


SOURCE_ALLOWED = {
    (Phase.NONE, Phase.BEGIN3),
    (Phase.BEGIN3, Phase.PERFORM3),
    (Phase.BEGIN3, Phase.CONFIRM3),  # offline, or a lost Finish settled as done
    (Phase.BEGIN3, Phase.CONFIRM3_CANCELLED),  # offline, or Prepare failed (client-driven)
    (Phase.PERFORM3, Phase.PERFORM3_DONE),
    (Phase.PERFORM3, Phase.CONFIRM3),  # a restarted srcd whose PERFORM3_DONE record was lost
    (Phase.PERFORM3, Phase.CONFIRM3_CANCELLED),  # Perform failed
    (Phase.PERFORM3_DONE, Phase.CONFIRM3),
    (Phase.PERFORM3_DONE, Phase.CONFIRM3_CANCELLED),
    (Phase.CONFIRM3, Phase.CONFIRM3),  # Confirm run again (retry, restart)
    (Phase.CONFIRM3_CANCELLED, Phase.CONFIRM3_CANCELLED),
}
DESTINATION_ALLOWED = {(Phase.NONE, Phase.PREPARE), (Phase.PREPARE, Phase.FINISH3)}
SOURCE_PHASES = [Phase.NONE, Phase.BEGIN3, Phase.PERFORM3, Phase.PERFORM3_DONE,
                 Phase.CONFIRM3_CANCELLED, Phase.CONFIRM3]
DESTINATION_PHASES = [Phase.NONE, Phase.PREPARE, Phase.FINISH3]


def _every(role: str, phases: list[Phase], allowed: set[tuple[Phase, Phase]]) -> list[Any]:
    return [pytest.param(role, old, new, (old, new) in allowed, id=f"{role}:{old.label}->{new.label}")
            for old in phases for new in phases]


@pytest.mark.parametrize(("role", "old", "new", "ok"),
                         _every("source", SOURCE_PHASES, SOURCE_ALLOWED)
                         + _every("destination", DESTINATION_PHASES, DESTINATION_ALLOWED))
def test_transition_table(role: str, old: Phase, new: Phase, ok: bool) -> None:
    """Every move between a role's phases: allowed exactly as the table says; backwards with
    libvirt's text, anything else refused as not allowed."""
    if ok:
        assert advance(old, new, role) is new
        return
    with pytest.raises(OperationInvalid) as err:
        check_phase_transition(old, new, role)
    if new < old:
        assert str(err.value) == f"migration protocol going backwards {old.label} => {new.label}"
    else:
        assert str(err.value).startswith(
            f"migration protocol does not allow {old.label} => {new.label}")


def test_table_matches_the_phases_roles() -> None:
    assert set(TRANSITIONS) == {"source", "destination"}
    assert {(o, n) for o, nexts in TRANSITIONS["source"].items() for n in nexts} == SOURCE_ALLOWED
    assert {(o, n) for o, nexts in TRANSITIONS["destination"].items()
            for n in nexts} == DESTINATION_ALLOWED


@pytest.mark.parametrize(("old", "new"), [
    (Phase.BEGIN3, Phase.PERFORM3_DONE),  # a stream never started cannot be complete
    (Phase.PERFORM3, Phase.PERFORM3),  # a second Perform
    (Phase.CONFIRM3_CANCELLED, Phase.CONFIRM3),  # a resumed source is never stopped after
    (Phase.BEGIN3, Phase.FINISH3),  # another role's phase
    (Phase.NONE, Phase.FINISH3),
    (Phase.FINISH3, Phase.FINISH3),
])
def test_refused_forward_moves(old: Phase, new: Phase) -> None:
    with pytest.raises(OperationInvalid, match="migration protocol does not allow"):
        check_phase_transition(old, new)


def test_job_advance_moves_its_record_too() -> None:
    import contextlib
    import types

    from vmmigrate.common.rpc import Deadline
    from vmmigrate.common.store import JobRecord
    from vmmigrate.srcd.jobs import SourceJob, SourceParams

    record = JobRecord(migration_id="m", role="source", domain_name="vm", domain_uuid="u",
                       phase=Phase.BEGIN3.label, flags=0, peer="")
    job = SourceJob(migration_id="m", domain=types.SimpleNamespace(name="vm", uuid="u"),  # type: ignore[arg-type]
                    flags=F.LIVE, params=SourceParams(), peer="", deadline=Deadline(1.0),
                    record=record, lock=None, cleanup=contextlib.AsyncExitStack())  # type: ignore[arg-type]
    job.advance(Phase.PERFORM3)
    assert (job.phase, job.record.phase) == (Phase.PERFORM3, "perform3")
    with pytest.raises(OperationInvalid, match="going backwards"):
        job.advance(Phase.BEGIN3)
    assert (job.phase, job.record.phase) == (Phase.PERFORM3, "perform3")


@dataclasses.dataclass
class _Job:
    phase: Phase


def test_require_guards_by_phase() -> None:
    ran: list[str] = []

    @require(Phase.BEGIN3, Phase.PERFORM3_DONE)
    async def confirm(ctx: str, job: _Job, cancelled: bool) -> str:
        ran.append(f"{ctx}:{cancelled}")
        return "done"

    @require(Phase.PREPARE, refuse=lambda job: JobActive(f"busy in {job.phase.label}"))
    async def finish(ctx: str, job: _Job) -> None:
        ran.append("finish")

    assert asyncio.run(confirm("c", _Job(Phase.PERFORM3_DONE), cancelled=True)) == "done"
    with pytest.raises(OperationInvalid, match=r"^migration job is in phase perform3, not begin3 or perform3_done$"):
        asyncio.run(confirm("c", _Job(Phase.PERFORM3), True))
    with pytest.raises(JobActive, match="busy in finish3"):
        asyncio.run(finish("c", _Job(Phase.FINISH3)))
    assert ran == ["c:True"]
