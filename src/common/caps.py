"""What a source (srcd's p2p driver, or migctl driving a migration) requires of a destination,
checked from its capabilities before Begin, with libvirt's texts."""

from __future__ import annotations

from vmmigrate.common.errors import ArgumentUnsupported
from vmmigrate.common.flags import MigrateFlag

PROTOCOL_VERSION = 3


def check_destination(protocol_version: int, offline: bool, flags: MigrateFlag) -> None:
    if protocol_version < PROTOCOL_VERSION:
        raise ArgumentUnsupported(
            "Destination libvirt does not support peer-to-peer migration protocol"
        )
    if MigrateFlag.OFFLINE in flags and not offline:
        raise ArgumentUnsupported("offline migration is not supported by the destination host")
