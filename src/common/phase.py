"""Migration job phases (libvirt's qemuMigrationJobPhase), the table of the moves allowed
between them per role, the one way to move, and a guard for code that needs a phase."""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import structlog
from vmmigrate.common.errors import OperationInvalid, VmmigrateError

log = structlog.get_logger("vmmigrate.phase")


class Phase(enum.IntEnum):
    """libvirt's qemuMigrationJobPhase, same numbers and strings."""

    NONE = 0  # no migration job
    PERFORM2 = 1  # v2 only; vmmigrate never uses it
    BEGIN3 = 2  # source: Begin ran, the job is held; next PERFORM3 or CONFIRM3*
    PERFORM3 = 3  # source: the hypervisor stream is running; next PERFORM3_DONE
    PERFORM3_DONE = 4  # source: stream complete, domain paused; next CONFIRM3*
    CONFIRM3_CANCELLED = 5  # source: Confirm(cancelled) runs; the job ends next
    CONFIRM3 = 6  # source: Confirm(success) runs; the job ends next
    PREPARE = 7  # destination: name/UUID reserved, incoming ready; next FINISH3
    FINISH2 = 8  # v2 only; vmmigrate never uses it
    FINISH3 = 9  # destination: Finish runs (persist, resume); the job ends next

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Phase:
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown migration phase {label!r}") from None


_CONFIRM = frozenset({Phase.CONFIRM3, Phase.CONFIRM3_CANCELLED})

# The moves each role's job may make (as simvm/machine.py's run states). Source: Begin
# takes the job at BEGIN3; Perform moves it to PERFORM3, then PERFORM3_DONE; Confirm ends
# it from any of those (offline skips Perform; a failed Prepare, Perform or Finish
# confirms cancelled; a restarted srcd settles a job left at PERFORM3 whose last record
# was lost, by the destination's answer). A Confirm that is run again (its retry, or a
# restarted srcd) stays in its phase; it never changes its outcome. Destination: Prepare
# reserves at PREPARE, Finish moves it to FINISH3 and ends it.
TRANSITIONS: dict[str, dict[Phase, frozenset[Phase]]] = {
    "source": {
        Phase.NONE: frozenset({Phase.BEGIN3}),
        Phase.BEGIN3: frozenset({Phase.PERFORM3}) | _CONFIRM,
        Phase.PERFORM3: frozenset({Phase.PERFORM3_DONE}) | _CONFIRM,
        Phase.PERFORM3_DONE: _CONFIRM,
        Phase.CONFIRM3_CANCELLED: frozenset({Phase.CONFIRM3_CANCELLED}),
        Phase.CONFIRM3: frozenset({Phase.CONFIRM3}),
    },
    "destination": {
        Phase.NONE: frozenset({Phase.PREPARE}),
        Phase.PREPARE: frozenset({Phase.FINISH3}),
        Phase.FINISH3: frozenset(),
    },
}

_DESTINATION_PHASES = frozenset({Phase.PREPARE, Phase.FINISH2, Phase.FINISH3})


def role_of(old: Phase, new: Phase) -> str:
    """The role whose table a move is checked against (the phases name it)."""
    return "destination" if {old, new} & _DESTINATION_PHASES else "source"


def check_phase_transition(old: Phase, new: Phase, role: str | None = None) -> None:
    """Refuse going backwards with libvirt's text (qemuMigrationCheckPhase), and any other
    move the role's table does not allow."""
    if new < old:
        raise OperationInvalid(f"migration protocol going backwards {old.label} => {new.label}")
    allowed = TRANSITIONS[role or role_of(old, new)].get(old, frozenset())
    if new not in allowed:
        raise OperationInvalid(
            f"migration protocol does not allow {old.label} => {new.label} "
            f"(next from {old.label}: {', '.join(sorted(p.label for p in allowed)) or 'none'})"
        )


def advance(old: Phase, new: Phase, role: str | None = None, **context: object) -> Phase:
    """Check and log one phase transition; returns the new phase."""
    check_phase_transition(old, new, role)
    log.info("phase_advanced", old=old.label, new=new.label, **context)
    return new


class PhasedJob(Protocol):
    @property
    def phase(self) -> Phase: ...


P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C")
J = TypeVar("J", bound=PhasedJob)


def _not_in_phase(job: PhasedJob, phases: tuple[Phase, ...]) -> VmmigrateError:
    wanted = " or ".join(p.label for p in phases)
    return OperationInvalid(f"migration job is in phase {job.phase.label}, not {wanted}")


class PhaseGuard(Protocol):
    def __call__(
        self, fn: Callable[Concatenate[C, J, P], Awaitable[T]], /
    ) -> Callable[Concatenate[C, J, P], Awaitable[T]]: ...


def require(*phases: Phase, refuse: Callable[[Any], VmmigrateError] | None = None) -> PhaseGuard:
    """Guard a phase function ``f(ctx, job, ...)``: it runs only while the job is in one of
    ``phases`` (QEMU qmp's ``@require(Runstate.IDLE)``); otherwise ``refuse(job)`` is
    raised (by default an OperationInvalid naming both phases)."""

    def guard(
        fn: Callable[Concatenate[C, J, P], Awaitable[T]],
    ) -> Callable[Concatenate[C, J, P], Awaitable[T]]:
        @functools.wraps(fn)
        async def guarded(ctx: C, job: J, /, *args: P.args, **kwargs: P.kwargs) -> T:
            if job.phase not in phases:
                raise refuse(job) if refuse is not None else _not_in_phase(job, phases)
            return await fn(ctx, job, *args, **kwargs)

        return guarded

    return guard
