"""Migration job phases (libvirt's qemuMigrationJobPhase) and the one way to move between them."""

from __future__ import annotations

import enum

import structlog
from vmmigrate.common.errors import OperationInvalid

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


def check_phase_transition(old: Phase, new: Phase) -> None:
    """Refuse to go backwards, with libvirt's text (qemuMigrationCheckPhase)."""
    if new < old:
        raise OperationInvalid(f"migration protocol going backwards {old.label} => {new.label}")


def advance(old: Phase, new: Phase, **context: object) -> Phase:
    """Check and log one phase transition; returns the new phase."""
    check_phase_transition(old, new)
    log.info("phase_advanced", old=old.label, new=new.label, **context)
    return new
