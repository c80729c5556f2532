"""A domain's ``<disk>`` elements, as the migration checks and simvm's command line see them,
and libvirt's disk checks of a live migration's Begin (and Prepare).

The safety check (libvirt's qemuMigrationSrcIsSafe, VIR_ERR_MIGRATE_UNSAFE): a live
migration without --unsafe refuses a disk that both hosts may write through their own page
cache, since the destination could read stale blocks the source had not written back. A
disk is safe when it has no source (a cdrom without media), is readonly or shareable, is
a network disk, is copied by the migration itself (storage copy), or uses cache mode
``none`` or ``directsync``. No ``cache`` attribute means the hypervisor's default
(writeback), which is unsafe: libvirt treats it so too, unless its QEMU can drop the
destination's caches, a capability vmmigrate does not probe.

libvirt also refuses a file disk on a local (non-shared) file system ("Migration without
shared storage is unsafe"). vmmigrate does not: it cannot tell from one host whether the
other sees the same file (two hosts on one machine share a local file system by
construction, or have private ones at the same path in their own mount namespaces); the
destination checks that the disk paths exist before it starts anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmmigrate.common.domainxml import Disk as Disk  # noqa: PLC0414 (its home before)
from vmmigrate.common.domainxml import DomainDef
from vmmigrate.common.errors import (
    ConfigUnsupported,
    InvalidArgument,
    MigrateUnsafe,
    OperationInvalid,
)
from vmmigrate.common.flags import MigrateFlag

SAFE_CACHE_MODES = frozenset({"none", "directsync"})
STORAGE_COPY = MigrateFlag.NON_SHARED_DISK | MigrateFlag.NON_SHARED_INC

UNSAFE_CACHE = (
    "Migration may lead to data corruption if disks use cache other than none or directsync"
)
SIMVM_STORAGE_COPY = "storage copy needs QEMU"
MIGRATE_DISKS_NEEDS_COPY = (
    "use of 'VIR_MIGRATE_PARAM_MIGRATE_DISKS' requires use of "
    "'VIR_MIGRATE_NON_SHARED_DISK' or 'VIR_MIGRATE_NON_SHARED_INC' flag"
)


def domain_disks(d: DomainDef) -> list[Disk]:
    """The ``<devices><disk>`` elements of ``d``, in document order (read once per
    definition: DomainDef.disks)."""
    return list(d.disks)


def copied_by_migration(disk: Disk, migrate_disks: Sequence[str]) -> bool:
    """Whether storage copy would copy ``disk`` (libvirt's qemuMigrationAnyCopyDisk): the
    disks named by --migrate-disks, else every writable, unshared disk with a source."""
    if migrate_disks:
        return disk.target in migrate_disks
    return not disk.shareable and not disk.readonly and not disk.empty


def copied_disks(disks: Sequence[Disk], migrate_disks: Sequence[str] = ()) -> list[Disk]:
    """The disks a storage copy copies, in document order (a disk without media has
    nothing to copy, even when --migrate-disks names it)."""
    return [d for d in disks if copied_by_migration(d, migrate_disks) and not d.empty]


def check_migration_safe(
    disks: Sequence[Disk], flags: MigrateFlag, migrate_disks: Sequence[str] = ()
) -> None:
    """libvirt's safety check of a live migration (skipped with --unsafe and offline)."""
    if flags & (MigrateFlag.UNSAFE | MigrateFlag.OFFLINE):
        return
    copying = bool(flags & STORAGE_COPY)
    for disk in disks:
        if disk.empty or disk.readonly or disk.type == "network":
            continue
        if copying and copied_by_migration(disk, migrate_disks):
            continue
        if disk.shareable or disk.cache in SAFE_CACHE_MODES:
            continue
        raise MigrateUnsafe(UNSAFE_CACHE)


def check_migrate_disks(
    disks: Sequence[Disk], flags: MigrateFlag, migrate_disks: Sequence[str]
) -> None:
    """--migrate-disks: libvirt's Begin rules (a known target, and storage copy asked)."""
    if not migrate_disks:
        return
    if not flags & STORAGE_COPY:
        raise OperationInvalid(MIGRATE_DISKS_NEEDS_COPY)
    targets = {disk.target for disk in disks}
    for name in migrate_disks:
        if name not in targets:
            raise InvalidArgument(f"disk target {name} not found")


def check_storage_copy(flags: MigrateFlag, emulator: str) -> None:
    """Storage copy (--copy-storage-all/-inc) of a simvm domain is refused before anything
    starts: simvm cannot mirror a disk. QEMU copies them over NBD (docs/ARCHITECTURE.md
    section 14)."""
    if not flags & STORAGE_COPY or MigrateFlag.OFFLINE in flags:
        return  # offline: the flag checks refuse it with libvirt's own text
    if emulator == "simvm":
        raise ConfigUnsupported(SIMVM_STORAGE_COPY)


def check_live_disks(
    d: DomainDef, flags: MigrateFlag, emulator: str, migrate_disks: Sequence[str] = ()
) -> None:
    """The disk checks of a live migration, in libvirt's Begin order: the safety check,
    then --migrate-disks, then (ours) whether storage copy can run for this emulator."""
    disks = domain_disks(d)
    check_migration_safe(disks, flags, migrate_disks)
    check_migrate_disks(disks, flags, migrate_disks)
    check_storage_copy(flags, emulator)
