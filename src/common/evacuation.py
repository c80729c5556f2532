"""What an evacuation moves and how: the rules migctl evacuate's fallback path and srcd's
MigrateMany (srcd/evacuate.py) share, so that both report the same reasons in the same words.
"""

from __future__ import annotations

import enum

from vmmigrate.common.errors import (
    OperationInvalid,
    PeerUnavailable,
    PermissionDenied,
    SameHost,
    Unauthenticated,
)
from vmmigrate.common.flags import MigrateFlag

# flags that only mean something for a live migration (the memory stream), dropped from
# the offline ones
LIVE_ONLY = MigrateFlag.TUNNELLED | MigrateFlag.AUTO_CONVERGE | MigrateFlag.UNSAFE
# errors about the destination or the hosts, not the domain: every later migration would
# fail the same way (ShuttingDown is a PeerUnavailable)
STOPS_EVACUATION = (SameHost, PeerUnavailable, Unauthenticated, PermissionDenied)


class Selection(enum.Enum):
    """Which domains move, and how (--live, --offline, or neither)."""

    ALL = "all"
    LIVE = "live"
    OFFLINE = "offline"


def domain_flags(
    selection: Selection, active: bool, persistent: bool, base: MigrateFlag
) -> MigrateFlag:
    """The flags of one domain's migration, from its state when its turn comes; raises
    OperationInvalid (the reason it is not moved) when the selection leaves it here."""
    if selection is Selection.LIVE and not active:
        raise OperationInvalid("domain is not running")
    if selection is Selection.OFFLINE and active:
        raise OperationInvalid("domain is running: evacuate --offline moves inactive domains")
    flags = base | (MigrateFlag.LIVE if active else MigrateFlag.OFFLINE)
    if not active:
        flags &= ~LIVE_ONLY
    if persistent:
        flags |= MigrateFlag.PERSIST_DEST | MigrateFlag.UNDEFINE_SOURCE
    return flags


def stopped_by(text: str) -> str:
    """The reason given to the domains not started after an error that stops the run."""
    return f"evacuation stopped by an earlier error: {text}"


STARTED_HERE = (
    "domain was started here during its offline migration: its definition was "
    "copied to the destination, but it still runs on this host"
)
