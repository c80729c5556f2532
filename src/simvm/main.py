"""simvm's command line, QEMU-like so that one driver builds both argvs::

    simvm -name NAME -uuid UUID -m MIB [-smp N] -qmp unix:PATH,server=on,wait=off [-S]
          [-incoming tcp:HOST:PORT | -incoming unix:PATH | -incoming defer]
          [-dirty-rate PAGES_PER_SEC] [-seed N] [-pidfile PATH]
          [-drive file=PATH,format=raw,if=virtio,cache=MODE[,readonly=on] ...]

Start-up order: the disks (opened as QEMU opens its images: a missing one is an error),
memory (filled from -seed unless -incoming), the -incoming listener, the
pidfile, then the QMP socket: once the socket exists, simvm is ready. Exit status 0 after
``quit`` or SIGTERM/SIGINT/SIGHUP (SHUTDOWN event first), 1 after a failed incoming
migration or a bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid as uuidlib
from collections.abc import Callable
from typing import NoReturn

from vmmigrate.common.version import package_version
from vmmigrate.simvm.disk import Drive, DriveError, DriveSpec, parse_drive
from vmmigrate.simvm.emulator import Emulator
from vmmigrate.simvm.machine import Machine, RunState
from vmmigrate.simvm.monitor import Monitor

log = logging.getLogger("simvm")

ExitRequest = Callable[[int, str], None]

NIL_UUID = "00000000-0000-0000-0000-000000000000"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(1, f"simvm: {message}\n")  # QEMU exits 1 on a bad command line


def _suboption(value: str, key: str) -> str:
    """QEMU's ``-opt VALUE`` or ``-opt key=VALUE,other=...``: the main value."""
    parts = value.split(",")
    for part in parts:
        if part.startswith(f"{key}="):
            return part[len(key) + 1 :]
    return parts[0]


def _mib(value: str) -> int:
    raw = _suboption(value, "size").strip().upper()
    scale = 1
    if raw.endswith(("M", "G")):
        scale = 1024 if raw.endswith("G") else 1
        raw = raw[:-1]
    if not raw.isdigit() or int(raw) * scale < 1:
        raise argparse.ArgumentTypeError(f"invalid memory size {value!r}")
    return int(raw) * scale


def _smp(value: str) -> int:
    raw = _suboption(value, "cpus")
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"invalid -smp {value!r}")
    return int(raw)


def _uuid(value: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid UUID {value!r}") from None


def _qmp(value: str) -> str:
    parts = value.split(",")
    if not parts[0].startswith("unix:") or len(parts[0]) <= 5:
        raise argparse.ArgumentTypeError(f"-qmp {value!r}: only unix:PATH,server=on is supported")
    for opt in parts[1:]:
        if opt in ("server=off", "nowait=off") or opt == "wait=on":
            raise argparse.ArgumentTypeError(f"-qmp {value!r}: simvm only listens (server=on)")
    return parts[0][5:]


def _incoming(value: str) -> str:
    if value != "defer" and not value.startswith(("tcp:", "unix:")):
        raise argparse.ArgumentTypeError(
            f"-incoming {value!r}: only tcp:HOST:PORT, unix:PATH or defer"
        )
    return value


def _drive(value: str) -> DriveSpec:
    try:
        return parse_drive(value)
    except DriveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="simvm", description="a QEMU stand-in speaking QMP", allow_abbrev=False)
    # QEMU spells it -version; --version is what the other three programs take
    p.add_argument(
        "-version",
        "--version",
        action="version",
        version=f"simvm {package_version()}",
        help="print the version and exit",
    )
    p.add_argument(
        "-name", default="", type=lambda v: _suboption(v, "guest"), help="guest=NAME or NAME"
    )
    p.add_argument("-uuid", default=NIL_UUID, type=_uuid, help="the domain's UUID")
    p.add_argument("-m", dest="mib", default=128, type=_mib, help="memory size in MiB")
    p.add_argument("-smp", default=1, type=_smp, help="accepted; simvm runs one vCPU thread")
    p.add_argument("-qmp", required=True, type=_qmp, help="unix:PATH,server=on,wait=off")
    p.add_argument("-S", dest="paused", action="store_true", help="do not start the vCPU")
    p.add_argument("-incoming", type=_incoming, help="tcp:HOST:PORT, unix:PATH or defer")
    p.add_argument(
        "-dirty-rate",
        dest="dirty_rate",
        default=0,
        type=_non_negative,
        help="pages the vCPU dirties per second while running",
    )
    p.add_argument("-seed", type=int, help="seed for memory content and vCPU writes")
    p.add_argument("-pidfile", help="write the process id to this file at start")
    p.add_argument(
        "-drive",
        dest="drives",
        action="append",
        default=[],
        type=_drive,
        help="file=PATH,format=raw,if=virtio,cache=MODE[,readonly=on]: a disk the guest "
        "writes records to (repeatable)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if os.environ.get("SIMVM_DEBUG") else logging.INFO,
        format=f"simvm[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    if args.pidfile:  # early, as QEMU: a supervisor can find the process while memory fills
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0
    finally:
        if args.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(args.pidfile)


def _open_drives(specs: list[DriveSpec], vm_uuid: str) -> list[Drive]:
    """Open every disk, or none (DriveError names the one that failed)."""
    drives: list[Drive] = []
    try:
        for spec in specs:
            drives.append(Drive(spec, vm_uuid))
    except DriveError:
        for drive in drives:
            drive.close()
        raise
    return drives


def _build(
    args: argparse.Namespace,
    monitor: Monitor,
    request_exit: ExitRequest,
    drives: list[Drive],
) -> Emulator:
    """The machine and its emulator as the command line asks (nothing started yet)."""
    if args.incoming:
        initial = RunState.INMIGRATE
    else:
        initial = RunState.PRELAUNCH if args.paused else RunState.RUNNING
    machine = Machine(
        args.mib,
        emit=monitor.emit,
        seed=args.seed,
        dirty_rate=args.dirty_rate,
        initial=initial,
        fill=not args.incoming,  # incoming memory arrives from the stream
        drives=drives,
    )
    emulator = Emulator(
        name=args.name,
        uuid=args.uuid,
        machine=machine,
        emit=monitor.emit,
        request_exit=request_exit,
        autostart=not args.paused,
    )
    monitor.emulator = emulator
    return emulator


async def _run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    exit_code: asyncio.Future[tuple[int, str]] = loop.create_future()

    def request_exit(code: int, reason: str) -> None:
        def settle() -> None:
            if not exit_code.done():
                exit_code.set_result((code, reason))

        loop.call_soon_threadsafe(settle)

    monitor = Monitor()
    try:
        drives = _open_drives(args.drives, args.uuid)
    except DriveError as exc:
        print(f"simvm: {exc}", file=sys.stderr)
        return 1
    emulator = _build(args, monitor, request_exit, drives)
    machine = emulator.machine
    if args.incoming == "defer":
        emulator.incoming_deferred = True
    elif args.incoming:
        try:
            emulator.listen_incoming(args.incoming)
        except (OSError, ValueError) as exc:
            print(f"simvm: -incoming {args.incoming}: {exc}", file=sys.stderr)
            return 1
    if args.incoming:
        machine.prefault()
    try:
        await monitor.start(args.qmp)
    except OSError as exc:
        print(f"simvm: -qmp unix:{args.qmp}: {exc}", file=sys.stderr)
        emulator.shutdown()
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, request_exit, 0, "host-signal")
    machine.start_vcpu()
    log.info(
        "started: name=%s uuid=%s memory=%d MiB state=%s dirty-rate=%d pages/s",
        args.name,
        args.uuid,
        args.mib,
        machine.state.value,
        args.dirty_rate,
    )
    code, reason = await exit_code
    if code == 0:
        monitor.emit("SHUTDOWN", {"guest": False, "reason": reason})
    else:
        print(f"simvm: load of migration failed: {reason}", file=sys.stderr)
    emulator.shutdown()
    await monitor.close()
    log.info("exiting with status %d", code)
    return code
