"""Storage copy, the destination's side (docs/ARCHITECTURE.md section 14): libvirt's
Prepare creates the disks the source copies that this host lacks, starts QEMU's NBD server
in the incoming emulator and exports each copied disk for writing; Finish stops the
server before the guest resumes.

Planning is pure (:func:`plan_disks`: what is copied, where, created or used as it is,
and whether this host allows it); the I/O follows: creation (journalled before the first
file exists, so that recovery finds what a crashed Prepare made), the NBD server, and the
removal of what this job created when it does not end with the domain here.

Security: dstd runs as root and the NBD export is written from the network, so a copied
disk must lie under one of the host's ``storage_dirs`` (resolved: a symlink out of them is
refused), and so must the backing file an overlay is created on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from vmmigrate.common import qemuargv
from vmmigrate.common.cookie import Nbd, NbdDisk
from vmmigrate.common.disks import STORAGE_COPY, Disk, domain_disks
from vmmigrate.common.domainxml import DomainDef
from vmmigrate.common.errors import ConfigUnsupported, OperationFailed
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.hostpaths import which
from vmmigrate.common.hypervisor import EmulatorPolicy
from vmmigrate.common.qmp import QMPError

if TYPE_CHECKING:  # incoming.py removes a dropped job's disks with remove_disks
    from vmmigrate.dstd.context import DestinationContext
    from vmmigrate.dstd.incoming import IncomingJob

log = structlog.get_logger("vmmigrate.dstd.storage")

CREATE_TIMEOUT = 60.0  # seconds one qemu-img create may take
NBD_PORT_ATTEMPTS = 4  # NBD servers started on another port after losing a port race


@dataclasses.dataclass(frozen=True)
class IncomingDisk:
    """One disk the source copies here: where it goes and how the emulator exports it."""

    target: str
    path: str
    format: str  # raw | qcow2: what a created file is
    capacity: int  # bytes, from the Begin cookie
    export: str  # NBD export name: "drive-" + the disk's alias (libvirt's)
    node: str  # the incoming emulator's format node of the disk
    create: bool  # the file is missing: this job creates it
    backing: str = ""  # --copy-storage-inc: the overlay's backing file (created disks)
    backing_format: str = ""


def copied_capacities(nbd: Nbd | None, flags: MigrateFlag) -> dict[str, int]:
    """target -> capacity of the disks the source copies (the Begin cookie's <nbd>)."""
    if nbd is None or not flags & STORAGE_COPY:
        return {}
    return {d.target: d.capacity for d in nbd.disks}


def storage_dir_of(path: str, storage_dirs: Sequence[str]) -> str | None:
    """The storage dir ``path`` resolves into (symlinks followed), or None."""
    real = os.path.realpath(path)
    for d in storage_dirs:
        base = os.path.realpath(d)
        if real.startswith(base.rstrip("/") + "/"):
            return d
    return None


def _outside(what: str, path: str, storage_dirs: Sequence[str]) -> ConfigUnsupported:
    allowed = ", ".join(storage_dirs) if storage_dirs else "none configured"
    return ConfigUnsupported(
        f"{what} '{path}' is outside the directories this host allows storage copy to "
        f"write (storage_dirs: {allowed})"
    )


def _created(
    disk: Disk, flags: MigrateFlag, storage_dirs: Sequence[str], exists: Callable[[str], bool]
) -> tuple[str, str, str]:
    """(format, backing, backing format) of a disk this host must create; refused when
    it cannot (libvirt precreates file disks only)."""
    if disk.type != "file":
        raise OperationFailed(f"cannot precreate storage for disk type '{disk.type}'")
    fmt = disk.format or "raw"
    if fmt not in ("raw", "qcow2"):
        raise ConfigUnsupported(f"cannot create disk '{disk.source}' of format '{fmt}'")
    if MigrateFlag.NON_SHARED_INC not in flags or fmt != "qcow2" or not disk.backing:
        return fmt, "", ""
    # --copy-storage-inc copies the top layer only: the overlay needs the same backing
    backing = disk.backing
    if not os.path.isabs(backing) or not exists(backing):
        raise OperationFailed(
            f"cannot create disk '{disk.source}' ({disk.target}) for incremental storage "
            f"copy: its backing file '{backing}' does not exist on this host"
        )
    if storage_dir_of(backing, storage_dirs) is None:
        raise _outside("backing file", backing, storage_dirs)
    return fmt, backing, disk.backing_format or "raw"


def plan_disks(
    running: DomainDef,
    nbd: Nbd | None,
    flags: MigrateFlag,
    storage_dirs: Sequence[str],
    exists: Callable[[str], bool] = os.path.exists,
) -> tuple[IncomingDisk, ...]:
    """The copied disks as this host will hold them: the Begin cookie names them, the XML
    it will run says where they are. A missing file is created (libvirt's precreation),
    an existing one used as it is. Refused, before anything is made: a disk the XML lacks,
    a path outside ``storage_dirs``, a disk that cannot be created."""
    capacities = copied_capacities(nbd, flags)
    if not capacities:
        return ()
    disks = {d.target: d for d in domain_disks(running)}
    nodes = qemuargv.disk_nodes(running)
    out = []
    for target, capacity in capacities.items():
        disk, names = disks.get(target), nodes.get(target)
        if disk is None or names is None:
            raise OperationFailed(f"unable to find disk by target: {target}")
        if storage_dir_of(disk.source, storage_dirs) is None:
            raise _outside(f"disk {target}:", disk.source, storage_dirs)
        create = not exists(disk.source)
        fmt, backing, backing_fmt = (
            _created(disk, flags, storage_dirs, exists) if create else ("", "", "")
        )
        out.append(
            IncomingDisk(
                target, disk.source, fmt, capacity, names.export, names.format_node, create,
                backing, backing_fmt,
            )
        )  # fmt: skip
    return tuple(out)


def reply_nbd(disks: Sequence[IncomingDisk], port: int) -> Nbd | None:
    """Prepare's answer: the NBD server's port (none when tunnelled) and the disks it
    exports, as libvirt answers."""
    if not disks:
        return None
    return Nbd(port=port or None, disks=tuple(NbdDisk(d.target, d.capacity) for d in disks))


# ---------------------------------------------------------------------------- creation


def _create_empty(path: str) -> bool:
    """Create ``path`` empty, never over an existing file; False if it exists now."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise OperationFailed(f"cannot create disk '{path}': {exc.strerror or exc}") from exc
    os.close(fd)
    return True


def qemu_img_create_args(disk: IncomingDisk) -> list[str]:
    """qemu-img's arguments to create ``disk`` (an overlay of its backing file for
    --copy-storage-inc)."""
    args = ["create", "-q", "-f", disk.format]
    if disk.backing:
        args += ["-b", disk.backing, "-F", disk.backing_format]
    return [*args, disk.path, str(disk.capacity)]


async def _qemu_img(disk: IncomingDisk) -> None:
    binary = which("qemu-img")
    if binary is None:
        raise OperationFailed(f"cannot create disk '{disk.path}': qemu-img is not installed")
    proc = await asyncio.create_subprocess_exec(
        binary,
        *qemu_img_create_args(disk),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CREATE_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationFailed(f"cannot create disk '{disk.path}': qemu-img timed out") from None
    if proc.returncode:
        reason = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise OperationFailed(f"cannot create disk '{disk.path}': {reason}")


def give_to_emulator(path: str, policy: EmulatorPolicy) -> None:
    """Created disks belong to the user the emulators run as (libvirt's qemu user)."""
    if policy.drops_privileges:
        uid = -1 if policy.uid is None else policy.uid
        gid = -1 if policy.gid is None else policy.gid
        os.chown(path, uid, gid)


async def _journal_created(ctx: DestinationContext, job: IncomingJob) -> None:
    job.record = dataclasses.replace(job.record, created_disks=job.created_disks)
    await asyncio.to_thread(ctx.store.journal_put, job.record)


async def create_disks(
    ctx: DestinationContext, job: IncomingJob, disks: Sequence[IncomingDisk]
) -> None:
    """Create the disks the plan says are missing. Their paths are in the job's journal
    record, durably, before the first file exists, so that whatever instant dstd dies at,
    its recovery removes them; a failure here leaves them to the job's drop."""
    todo = [d for d in disks if d.create]
    if not todo:
        return
    job.created_disks = tuple(d.path for d in todo)
    await _journal_created(ctx, job)
    await ctx.failpoints.hit("dstd.prepare.before_create")
    for disk in todo:
        if not await asyncio.to_thread(_create_empty, disk.path):
            # someone made it since the plan: it is not ours to remove, and used as it is
            job.created_disks = tuple(p for p in job.created_disks if p != disk.path)
            await _journal_created(ctx, job)
            continue
        await _qemu_img(disk)
        await asyncio.to_thread(give_to_emulator, disk.path, ctx.hypervisor.settings.policy)
        log.info("incoming_disk_created", target=disk.target, path=disk.path, format=disk.format)


def remove_disks(paths: Iterable[str]) -> None:
    """Remove disks a job created (never others): a failed or cancelled migration leaves
    nothing of its storage copy on this host."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("incoming_disk_not_removed", path=path, error=str(exc))
            continue
        log.info("incoming_disk_removed", path=path)


# ---------------------------------------------------------------------------- NBD server


def _server_address(job: IncomingJob, socket_dir: os.PathLike[str] | str) -> dict[str, Any]:
    if job.tunnelled:
        # the disks' streams arrive through dstd, like the memory: a private unix socket
        job.nbd_path = os.path.join(socket_dir, f"{job.target.uuid}.nbd")
        return {"type": "unix", "data": {"path": job.nbd_path}}
    return {"type": "inet", "data": {"host": job.host, "port": str(job.nbd_port)}}


async def _start_server(ctx: DestinationContext, job: IncomingJob) -> None:
    """nbd-server-start on the migration host and a port of the migration range (taken
    again if another process bound it first), or on the tunnel's unix socket."""
    lost: list[int] = []
    try:
        while True:
            if not job.tunnelled:
                job.nbd_port = await asyncio.to_thread(ctx.ports.acquire, job.host)
            addr = _server_address(job, ctx.hypervisor.socket_dir)
            try:
                await ctx.hypervisor.execute(job.target.uuid, "nbd-server-start", {"addr": addr})
                return
            except QMPError as exc:
                if job.tunnelled or "in use" not in str(exc) or len(lost) + 1 >= NBD_PORT_ATTEMPTS:
                    raise
                lost.append(job.nbd_port)
                job.nbd_port = 0
    finally:
        for port in lost:
            ctx.ports.release(port)


async def start_nbd(
    ctx: DestinationContext, job: IncomingJob, disks: Sequence[IncomingDisk]
) -> Nbd | None:
    """Start the incoming emulator's NBD server and export each copied disk for writing;
    returns the ``<nbd>`` of Prepare's answer (None: nothing is copied)."""
    if not disks:
        return None
    try:
        await _start_server(ctx, job)
        for disk in disks:
            await ctx.hypervisor.execute(
                job.target.uuid,
                "block-export-add",
                {
                    "type": "nbd",
                    "id": disk.export,
                    "node-name": disk.node,
                    "name": disk.export,
                    "writable": True,
                },
            )
    except QMPError as exc:
        raise OperationFailed(f"cannot export the disks for storage copy: {exc}") from exc
    log.info(
        "incoming_nbd_started",
        port=job.nbd_port or None,
        socket=job.nbd_path or None,
        exports=[d.export for d in disks],
    )
    return reply_nbd(disks, job.nbd_port)


async def stop_nbd(ctx: DestinationContext, job: IncomingJob) -> None:
    """Finish: stop the NBD server before the guest resumes (libvirt does it in Finish):
    nothing may write the disks behind the running guest's back."""
    if not (job.nbd_port or job.nbd_path):
        return
    try:
        await ctx.hypervisor.execute(job.target.uuid, "nbd-server-stop")
    except QMPError as exc:
        raise OperationFailed(f"cannot stop the NBD server of storage copy: {exc}") from exc
    log.info("incoming_nbd_stopped", migration_id=job.migration_id)
