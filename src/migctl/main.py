"""migctl: the thin client, with virsh's command and option names.

    migctl [-c|--connect HOST:PORT] COMMAND ...

Errors go to stderr as virsh prints them (``error: Failed to VERB domain 'NAME'``, then
``error: `` with libvirt's category and the message) with exit status 1; success exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc.aio
from vmmigrate.common.address import (
    DEFAULT_SRCD_PORT,
    DEFAULT_TLS_DIR,
    is_loopback,
    parse_hostport,
)
from vmmigrate.common.errors import (
    InvalidArgument,
    NoDomain,
    PeerUnavailable,
    Unauthenticated,
    VmmigrateError,
    libvirt_text,
)
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.rpc import Deadline, call, open_channel
from vmmigrate.common.version import add_version_option
from vmmigrate.migctl import helptext, observe, pki, progress
from vmmigrate.migctl.rules import check_stream_options
from vmmigrate.migctl.uri import dest_address

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from vmmigrate.common.tls import TlsFiles

DAEMON = "daemon"
STATE_WORDS = {
    pb.DOMAIN_STATE_UNSPECIFIED: "no state",
    pb.DOMAIN_STATE_RUNNING: "running",
    pb.DOMAIN_STATE_BLOCKED: "idle",
    pb.DOMAIN_STATE_PAUSED: "paused",
    pb.DOMAIN_STATE_SHUTDOWN: "in shutdown",
    pb.DOMAIN_STATE_SHUTOFF: "shut off",
    pb.DOMAIN_STATE_CRASHED: "crashed",
    pb.DOMAIN_STATE_PMSUSPENDED: "pmsuspended",
}
# Deadline of a simple API call, and of a whole migration, seconds.
CALL_TIMEOUT = 30.0
DEFAULT_MIGRATE_TIMEOUT = 600.0
# evacuate's migrations at once: a few, so that one slow live migration does not hold up
# the rest, without making the destination take dozens at once
DEFAULT_EVACUATE_PARALLEL = 4


class LocalFileError(InvalidArgument):
    """A file named on the command line that cannot be read: libvirt reports it as a system
    error (no category), before any "Failed to ..." line."""

    libvirt_category = ""


class UsageError(Exception):
    """A command line that virsh would refuse before talking to any daemon."""


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _build_parser() -> ArgParser:
    ap = ArgParser(
        prog="migctl",
        description="vmmigrate client, with virsh's command and option names "
        "('migctl help' lists the commands by group, 'migctl help COMMAND' shows one)",
    )
    add_version_option(ap, "migctl")
    ap.add_argument(
        "-c",
        "--connect",
        default=os.environ.get("MIGCTL_CONNECT") or f"127.0.0.1:{DEFAULT_SRCD_PORT}",
        help="srcd address HOST:PORT (default $MIGCTL_CONNECT, else 127.0.0.1:7301)",
    )
    ap.add_argument(
        "--tls-dir",
        default=os.environ.get("MIGCTL_TLS_DIR") or None,
        help="directory with ca.pem, cert.pem, key.pem from 'migctl pki issue' "
        f"(default $MIGCTL_TLS_DIR, else {DEFAULT_TLS_DIR} if present)",
    )
    ap.add_argument(
        "--insecure",
        action="store_true",
        help="talk plaintext, without TLS (otherwise only to loopback addresses)",
    )
    sub = ap.add_subparsers(
        dest="command", required=True, parser_class=ArgParser, metavar="COMMAND"
    )
    p = sub.add_parser("help", help="print help: every command, or one command's page")
    p.add_argument("topic", nargs="?", metavar="COMMAND", help="a command or a group keyword")
    _add_domain_parsers(sub)
    _add_migrate_parsers(sub)
    _add_evacuate_parser(sub)
    observe.add_parsers(sub)
    pki.add_parser(sub)
    return ap


DOMAIN_HELP = "domain name or uuid"


def _add_domain_parsers(sub: Any) -> None:
    """Defining, listing, querying and running domains."""
    p = sub.add_parser("define", help="define (but don't start) a domain from an XML file")
    p.add_argument("file", help="file containing an XML domain description")
    p = sub.add_parser("undefine", help="undefine a domain (its definition, not its disks)")
    p.add_argument("domain", help=DOMAIN_HELP)
    p = sub.add_parser("list", help="list domains (running ones unless --all or --inactive)")
    p.add_argument("--all", action="store_true", help="active and inactive domains")
    p.add_argument("--inactive", action="store_true", help="inactive domains only")
    p.add_argument("--name", action="store_true", help="names only, one per line")
    p.add_argument("--uuid", action="store_true", help="UUIDs only, one per line")
    p.add_argument("--json", action="store_true", help="one JSON document")
    for cmd, text in (
        ("domstate", "the state of a domain"),
        ("dominfo", "basic information about a domain"),
        ("domuuid", "convert a domain name to its UUID"),
        ("domname", "convert a domain UUID to its name"),
    ):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("domain", help=DOMAIN_HELP)
        if cmd == "dominfo":
            p.add_argument("--json", action="store_true", help="one JSON document")
    p = sub.add_parser("dumpxml", help="domain information in XML")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("--inactive", action="store_true", help="the persistent definition")
    for cmd, text in (
        ("start", "start a (previously defined) inactive domain"),
        ("destroy", "stop a domain at once (power off)"),
        ("shutdown", "ask a domain to shut down"),
        ("suspend", "pause a running domain"),
        ("resume", "resume a paused domain"),
        ("domjobabort", "abort the domain's active migration job"),
        ("migrate-getspeed", "the maximum migration bandwidth of a domain, MiB/s"),
    ):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("domain", help=DOMAIN_HELP)


# options migrate and evacuate both take, word for word
_SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "--unsafe": {
        "action": "store_true",
        "help": "migrate even if disks may be corrupted (cache other than none or directsync)",
    },
    "--auto-converge": {
        "action": "store_true",
        "help": "throttle vCPUs until the copy converges",
    },
    "--timeout-suspend": {
        "action": "store_true",
        "help": "with --timeout: suspend (virsh's default: --timeout alone does the same)",
    },
    "desturi": {
        "help": "the destination: HOST[:PORT] of its dstd (7302) or qemu+tls://HOST/system",
    },
}


def _add_shared(p: argparse.ArgumentParser, *names: str) -> None:
    """Add these of _SHARED_OPTIONS, in this order (help shows them in the parser's)."""
    for name in names:
        p.add_argument(name, **_SHARED_OPTIONS[name])


def _add_disk_options(p: argparse.ArgumentParser) -> None:
    """migrate's disk options: storage copy and the safety check's override."""
    p.add_argument("--copy-storage-all", action="store_true", help="copy non-shared disks in full")
    p.add_argument(
        "--copy-storage-inc", action="store_true", help="copy non-shared disks incrementally"
    )
    p.add_argument(
        "--migrate-disks",
        metavar="DISKS",
        help="with --copy-storage-*: the disk targets to copy, comma-separated (vda,vdb)",
    )
    _add_shared(p, "--unsafe")


def _add_migrate_parsers(sub: Any) -> None:
    """The migration commands: migrate and its job's queries and tunables."""
    p = sub.add_parser("domjobinfo", help="statistics of the domain's migration job")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("--completed", action="store_true", help="the last finished job")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p = sub.add_parser("migrate-setspeed", help="set the maximum migration bandwidth, MiB/s")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("bandwidth", type=int, help="bandwidth limit in MiB/s")
    p = sub.add_parser("migrate-setmaxdowntime", help="set the maximum tolerable downtime, ms")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("downtime", type=int, help="maximum tolerable downtime, ms")

    p = sub.add_parser(
        "migrate",
        help="migrate a domain to another host",
        description="Migrate a domain to another host: --live moves a running domain, "
        "--offline only its definition (with --persistent). --p2p lets srcd drive the "
        "migration; without it migctl drives the phases itself.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="live migration of a running domain")
    mode.add_argument("--offline", action="store_true", help="move the definition only")
    p.add_argument("--p2p", action="store_true", help="peer-to-peer: srcd drives the migration")
    p.add_argument(
        "--tunnelled",
        "--tunneled",
        action="store_true",
        help="carry the memory stream over the daemons' connection (with --p2p)",
    )
    p.add_argument("--persistent", action="store_true", help="define the domain on the target")
    p.add_argument("--undefinesource", action="store_true", help="undefine it on the source")
    p.add_argument("--suspend", action="store_true", help="leave it paused on the target")
    _add_disk_options(p)
    _add_shared(p, "--auto-converge")
    p.add_argument("--verbose", action="store_true", help="print the progress of a migration")
    p.add_argument("--dname", help="the domain's new name on the target")
    p.add_argument("--xml", metavar="FILE", help="file with the domain XML for the target")
    p.add_argument(
        "--persistent-xml", metavar="FILE", help="file with the persistent XML for the target"
    )
    p.add_argument("--bandwidth", type=int, metavar="MiB/s", help="bandwidth limit, MiB/s")
    p.add_argument(
        "--timeout",
        type=int,
        metavar="S",
        help="suspend the domain if a live migration takes longer than S seconds",
    )
    _add_shared(p, "--timeout-suspend")
    p.add_argument("--migration-id", help="the migration's id (default: a new UUID)")
    p.add_argument("domain", help=DOMAIN_HELP)
    _add_shared(p, "desturi")


EVACUATE_DESCRIPTION = (
    "Move every domain (or those named with --domain) off the host migctl is connected "
    "to: running and paused ones live, inactive ones offline, each as one peer-to-peer "
    "migration (migrate --p2p), at most --parallel at once. Definitions move: persistent "
    "domains are defined on the destination and undefined here (--persistent "
    "--undefinesource); transient ones stay transient. --live moves only the running "
    "domains, --offline only the inactive ones; the others are reported as not moved. A "
    "domain that vanished or changed state meanwhile is reported. Ctrl-C starts no new "
    "migration and waits for the running ones; a second Ctrl-C aborts them. Prints a "
    "summary; exit status 1 if any domain did not move."
)


def _add_evacuate_parser(sub: Any) -> None:
    """evacuate's command line (its code, src/migctl/evacuate.py, is imported only when it
    runs: migctl's other commands start without it)."""
    p = sub.add_parser(
        "evacuate",
        help="migrate every domain of this host to another host",
        description=EVACUATE_DESCRIPTION,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="move only the running domains")
    mode.add_argument("--offline", action="store_true", help="move only the inactive domains")
    p.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_EVACUATE_PARALLEL,
        metavar="N",
        help=f"migrations at once (default {DEFAULT_EVACUATE_PARALLEL}; srcd's max_outgoing "
        "caps it)",
    )
    p.add_argument(
        "--domain",
        action="append",
        dest="domains",
        metavar="NAME",
        help="move only this domain (name or uuid); may be given more than once",
    )
    p.add_argument(
        "--tunnelled",
        "--tunneled",
        action="store_true",
        help="carry the live migrations' memory streams over the daemons' connection",
    )
    p.add_argument(
        "--bandwidth", type=int, metavar="MiB/s", help="bandwidth limit of each live migration"
    )
    _add_shared(p, "--auto-converge", "--unsafe")
    p.add_argument(
        "--timeout",
        type=int,
        metavar="S",
        help="suspend a domain whose live migration takes longer than S seconds",
    )
    _add_shared(p, "--timeout-suspend", "desturi")


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:  # no pathlib: migctl starts faster
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalFileError(f"Failed to open file '{path}': {exc}") from exc


def migrate_flags(a: argparse.Namespace) -> MigrateFlag:
    """virsh's option -> flag mapping (docs/ARCHITECTURE.md section 9), with its own
    command-line rules."""
    check_stream_options(a, "migrate", offline=a.offline or not a.live, error=UsageError)
    mapping = {
        "live": MigrateFlag.LIVE,
        "offline": MigrateFlag.OFFLINE,
        "p2p": MigrateFlag.PEER2PEER,
        "tunnelled": MigrateFlag.TUNNELLED,
        "persistent": MigrateFlag.PERSIST_DEST,
        "undefinesource": MigrateFlag.UNDEFINE_SOURCE,
        "suspend": MigrateFlag.PAUSED,
        "copy_storage_all": MigrateFlag.NON_SHARED_DISK,
        "copy_storage_inc": MigrateFlag.NON_SHARED_INC,
        "unsafe": MigrateFlag.UNSAFE,
        "auto_converge": MigrateFlag.AUTO_CONVERGE,
    }
    flags = MigrateFlag(0)
    for option, flag in mapping.items():
        if getattr(a, option):
            flags |= flag
    return flags


def migrate_params(a: argparse.Namespace) -> pb.MigrationParams:
    if a.dname is not None and not a.dname:
        raise InvalidArgument("dname must not be empty")
    return pb.MigrationParams(
        dest_name=a.dname or "",
        dest_xml=_read_file(a.xml) if a.xml else "",
        persist_xml=_read_file(a.persistent_xml) if a.persistent_xml else "",
        bandwidth_mib=a.bandwidth or 0,
        timeout_s=a.timeout or 0,
        # virsh's rule: --timeout's action is to suspend unless another is named (the RPC
        # keeps timeout_suspend=False, abort, for API callers that want it)
        timeout_suspend=a.timeout_suspend or a.timeout is not None,
        migrate_disks=_disk_list(a.migrate_disks),
    )


def _disk_list(value: str | None) -> list[str]:
    """--migrate-disks' comma-separated disk targets (empty items ignored)."""
    if value is None:
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


def _print_table(rows: list[pb.ListEntry]) -> None:
    ids = ["-" if e.domain.id < 0 else str(e.domain.id) for e in rows]
    names = [e.domain.name for e in rows]
    states = [STATE_WORDS.get(e.state, "no state") for e in rows]
    wid = max([2, *map(len, ids)])
    wname = max([4, *map(len, names)])
    header = f" {'Id':<{wid}}   {'Name':<{wname}}   State"
    print(header)
    print("-" * (len(header) + 7))
    for i, n, s in zip(ids, names, states, strict=True):
        print(f" {i:<{wid}}   {n:<{wname}}   {s}")
    print()


def _client_tls(a: argparse.Namespace) -> TlsFiles | None:
    """TLS material for srcd at --connect, or None for plaintext: --insecure, or a loopback
    address with no TLS directory. Plaintext elsewhere needs --insecure."""
    if a.insecure:
        return None
    directory = Path(a.tls_dir) if a.tls_dir else None
    if directory is None and DEFAULT_TLS_DIR.is_dir():
        directory = DEFAULT_TLS_DIR
    if directory is None:
        if is_loopback(parse_hostport(a.connect, DEFAULT_SRCD_PORT)[0]):
            return None
        raise InvalidArgument(
            f"no TLS material to reach {a.connect} (no --tls-dir, no $MIGCTL_TLS_DIR, no "
            f"{DEFAULT_TLS_DIR}): make a client certificate with 'migctl pki issue CA_DIR "
            "--client NAME --role admin --out DIR' and pass --tls-dir DIR, or pass "
            "--insecure to talk plaintext"
        )
    # imported only for TLS: plaintext to loopback starts without the certificate machinery
    from vmmigrate.common.tls import TlsFiles  # noqa: PLC0415

    tls = TlsFiles(directory)
    expiry = tls.current().not_after
    if expiry <= datetime.datetime.now(datetime.UTC):
        raise Unauthenticated(
            f"authentication failed: the certificate in {directory} expired on "
            f"{expiry:%Y-%m-%d %H:%M} UTC: issue a new one with 'migctl pki issue'"
        )
    return tls


def _handshake_hint(exc: PeerUnavailable, tls: TlsFiles | None) -> VmmigrateError:
    """A daemon that closes the connection right after it opened refused the handshake
    (TLS 1.3 tells the client only then): say so instead of "unable to connect"."""
    if "Socket closed" not in exc.message:
        return exc
    if tls is None:
        return PeerUnavailable(f"{exc.message} (does the daemon require TLS? pass --tls-dir)")
    return Unauthenticated(
        f"authentication failed: TLS handshake refused by the daemon: check --tls-dir "
        f"{tls.directory} (a certificate from the cluster's CA, not expired) ({exc.message})"
    )


async def run(a: argparse.Namespace) -> int:
    address = a.connect
    tls = _client_tls(a)
    channel = open_channel(address, tls=tls)
    try:
        handler = COMMANDS.get(a.command) or _cmd_lifecycle
        return await handler(a, _Session(address, channel)) or 0
    except PeerUnavailable as exc:
        raise _handshake_hint(exc, tls) from exc
    finally:
        await channel.close(None)


class _Session:
    """One command's connection to srcd: the channel, its stub, and calls with a deadline."""

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.dom = pb_grpc.DomainServiceStub(channel)

    async def rpc(self, method: Any, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return await call(method, request, timeout=timeout, peer=self.address, what=DAEMON)


async def _cmd_define(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.Define, pb.DefineRequest(xml=_read_file(a.file)))
    print(f"Domain '{r.domain.name}' defined from {a.file}")


async def _cmd_undefine(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.Undefine, pb.UndefineRequest(domain=a.domain))
    print(f"Domain '{r.domain.name}' has been undefined")


async def _cmd_list(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.List, pb.ListRequest(all=a.all or a.inactive))
    rows = [e for e in r.domains if not a.inactive or e.state == pb.DOMAIN_STATE_SHUTOFF]
    if a.json:
        observe.list_json(rows, STATE_WORDS)
    elif a.name or a.uuid:
        for e in rows:
            print(e.domain.name if a.name else e.domain.uuid)
    else:
        _print_table(rows)


async def _cmd_domstate(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.GetState, pb.DomainRequest(domain=a.domain))
    print(STATE_WORDS.get(r.state, "no state"))


async def _cmd_domuuid_or_name(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.GetInfo, pb.DomainRequest(domain=a.domain))
    print(r.domain.uuid if a.command == "domuuid" else r.domain.name)


async def _cmd_dominfo(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.GetInfo, pb.DomainRequest(domain=a.domain))
    if a.json:
        return observe.dominfo_json(r, STATE_WORDS)
    rows = [
        ("Id", "-" if r.domain.id < 0 else str(r.domain.id)),
        ("Name", r.domain.name),
        ("UUID", r.domain.uuid),
        ("OS Type", r.os_type),
        ("State", STATE_WORDS.get(r.state, "no state")),
        ("CPU(s)", str(r.vcpus)),
        ("Max memory", f"{r.max_memory_kib} KiB"),
        ("Used memory", f"{r.used_memory_kib} KiB"),
        ("Persistent", "yes" if r.persistent else "no"),
        ("Autostart", "enable" if r.autostart else "disable"),
    ]
    if r.migration_job:
        rows.append(("Migration job", r.migration_job))
    for k, v in rows:
        print(f"{k + ':':<16}{v}")
    print()


async def _cmd_dumpxml(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.DumpXML, pb.DumpXMLRequest(domain=a.domain, inactive=a.inactive))
    sys.stdout.write(r.xml if r.xml.endswith("\n") else r.xml + "\n")


async def _cmd_migrate(a: argparse.Namespace, s: _Session) -> None:
    flags = migrate_flags(a)
    params = migrate_params(a)
    dest = dest_address(a.desturi)
    seconds = _migrate_timeout()
    migration: Any
    if MigrateFlag.PEER2PEER in flags:
        request = pb.MigrateRequest(
            domain=a.domain,
            dest_uri=dest,
            flags=int(flags),
            params=params,
            migration_id=a.migration_id or "",
        )
        migration = s.rpc(s.dom.Migrate, request, timeout=seconds)
    else:
        # imported here: a p2p migrate (the common case) starts faster without the
        # client-driven sequence's modules
        from vmmigrate.migctl import managed  # noqa: PLC0415

        migration = managed.migrate(
            source=pb_grpc.MigrationSourceServiceStub(s.channel),
            source_address=s.address,
            dest_address=dest,
            domain=a.domain,
            flags=flags,
            params=params,
            migration_id=a.migration_id,
            deadline=Deadline(seconds),
        )
    live = MigrateFlag.OFFLINE not in flags
    await progress.watch(
        migration,
        domains=s.dom,
        address=s.address,
        domain=a.domain,
        verbose=a.verbose and live,
        abortable=live,
    )


def _migrate_timeout() -> float:
    """The deadline of one migration, seconds (read when a command runs, not at import)."""
    return float(os.environ.get("MIGCTL_MIGRATE_TIMEOUT", DEFAULT_MIGRATE_TIMEOUT))


async def _cmd_evacuate(a: argparse.Namespace, s: _Session) -> int:
    """Every domain (or the named ones) off this host: one p2p Migrate each
    (src/migctl/evacuate.py); the exit status says whether all moved."""
    # imported here: only evacuate needs it (migctl's start-up stays as it was)
    from vmmigrate.migctl import evacuate  # noqa: PLC0415

    dest = dest_address(a.desturi)
    try:
        return await evacuate.evacuate(a, s, dest, _migrate_timeout(), sys.stdout)
    except evacuate.EvacuateUsageError as exc:
        raise UsageError(str(exc)) from None


async def _cmd_lifecycle(a: argparse.Namespace, s: _Session) -> None:
    method, words = LIFECYCLE[a.command]
    r = await s.rpc(getattr(s.dom, method), pb.DomainRequest(domain=a.domain))
    print(f"Domain '{r.domain.name}' {words}")


async def _cmd_domjobinfo(a: argparse.Namespace, s: _Session) -> None:
    request = pb.JobInfoRequest(domain=a.domain, completed=a.completed)
    info = await s.rpc(s.dom.GetJobInfo, request)
    observe.jobinfo_json(info) if a.json else print_jobinfo(info)


async def _cmd_domjobabort(a: argparse.Namespace, s: _Session) -> None:
    await s.rpc(s.dom.AbortJob, pb.AbortJobRequest(domain=a.domain))


async def _cmd_setspeed(a: argparse.Namespace, s: _Session) -> None:
    await s.rpc(s.dom.SetMaxSpeed, pb.SpeedRequest(domain=a.domain, bandwidth_mib=a.bandwidth))


async def _cmd_getspeed(a: argparse.Namespace, s: _Session) -> None:
    r = await s.rpc(s.dom.GetMaxSpeed, pb.DomainRequest(domain=a.domain))
    print(r.bandwidth_mib)


async def _cmd_setmaxdowntime(a: argparse.Namespace, s: _Session) -> None:
    await s.rpc(s.dom.SetMaxDowntime, pb.DowntimeRequest(domain=a.domain, downtime_ms=a.downtime))


# a command returns its exit status, or None for 0 (its errors raise)
Command = Callable[[argparse.Namespace, _Session], Awaitable[int | None]]
COMMANDS: dict[str, Command] = {
    "define": _cmd_define,
    "undefine": _cmd_undefine,
    "list": _cmd_list,
    "domstate": _cmd_domstate,
    "domuuid": _cmd_domuuid_or_name,
    "domname": _cmd_domuuid_or_name,
    "dominfo": _cmd_dominfo,
    "dumpxml": _cmd_dumpxml,
    "migrate": _cmd_migrate,
    "evacuate": _cmd_evacuate,
    "domjobinfo": _cmd_domjobinfo,
    "domjobabort": _cmd_domjobabort,
    "migrate-setspeed": _cmd_setspeed,
    "migrate-getspeed": _cmd_getspeed,
    "migrate-setmaxdowntime": _cmd_setmaxdowntime,
    "event": observe.cmd_event,
    "jobs": observe.cmd_jobs,
}  # every other command is a lifecycle one (LIFECYCLE)


LIFECYCLE = {
    "start": ("Start", "started"),
    "destroy": ("Destroy", "destroyed"),
    "shutdown": ("Shutdown", "is being shutdown"),
    "suspend": ("Suspend", "suspended"),
    "resume": ("Resume", "resumed"),
}


def print_jobinfo(info: pb.JobInfo) -> None:
    """virsh domjobinfo's layout."""
    mib = 1024 * 1024
    rows = [("Job type", info.type or "None")]
    if info.type not in ("", "None"):
        rows += [
            ("Operation", info.operation),
            ("Time elapsed", f"{info.time_elapsed_ms:<12} ms"),
            ("Data processed", f"{info.data_processed / mib:.3f} MiB"),
            ("Data remaining", f"{info.data_remaining / mib:.3f} MiB"),
            ("Data total", f"{info.data_total / mib:.3f} MiB"),
        ]
        if info.memory_total:
            rows += [
                ("Memory processed", f"{info.memory_processed / mib:.3f} MiB"),
                ("Memory remaining", f"{info.memory_remaining / mib:.3f} MiB"),
                ("Memory total", f"{info.memory_total / mib:.3f} MiB"),
            ]
        rows += [
            ("Memory bandwidth", f"{info.memory_bps / mib:.3f} MiB/s"),
            ("Dirty rate", f"{info.dirty_rate:<12} pages/s"),
            ("Page size", f"{info.page_size:<12} bytes"),
            ("Iteration", str(info.iteration)),
        ]
        if info.auto_converge_throttle:
            rows.append(("Auto converge throttle", f"{info.auto_converge_throttle:<12} %"))
        if info.type == "Completed":
            rows.append(("Total downtime", f"{info.downtime_ms:<12} ms"))
        if info.disk_total:  # storage copy: the disks' part of the Data lines
            rows += [
                ("File processed", f"{info.disk_processed / mib:.3f} MiB"),
                ("File remaining", f"{info.disk_remaining / mib:.3f} MiB"),
                ("File total", f"{info.disk_total / mib:.3f} MiB"),
            ]
        if info.error:
            rows.append(("Error message", info.error))
    for k, v in rows:
        print(f"{k + ':':<18}{v}")
    print()


def main(argv: list[str] | None = None) -> None:
    ap = _build_parser()
    try:
        a = ap.parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(_execute(ap, a))


def _execute(ap: ArgParser, a: argparse.Namespace) -> int:
    try:
        if a.command == "help":
            return _cmd_help(ap, a)
        # pki makes certificates locally: no daemon, no channel
        return pki.run(a) if a.command == "pki" else asyncio.run(run(a))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except VmmigrateError as exc:
        report_error(a, exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
    return 1


def _cmd_help(ap: ArgParser, a: argparse.Namespace) -> int:
    try:
        text = helptext.command_page(ap, a.topic) if a.topic else helptext.overview(ap)
    except helptext.HelpError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(text)
    return 0


# virsh's first error line per command (its vshError text), before libvirt's own message
FAILED_TO = {
    "define": "Failed to define domain from {file}",
    "undefine": "Failed to undefine domain '{domain}'",
    "start": "Failed to start domain '{domain}'",
    "destroy": "Failed to destroy domain '{domain}'",
    "shutdown": "Failed to shutdown domain '{domain}'",
    "suspend": "Failed to suspend domain '{domain}'",
    "resume": "Failed to resume domain '{domain}'",
    "migrate": "Failed to migrate domain '{domain}'",
}


def error_lines(a: argparse.Namespace, exc: VmmigrateError) -> list[str]:
    """What virsh prints for a failed command: its own line where it has one (the lookup
    that failed, the connection that failed, or the command's verb), then libvirt's
    category and message."""
    first = None
    domain = getattr(a, "domain", None)
    if isinstance(exc, LocalFileError):
        first = None  # the command never ran
    elif isinstance(exc, NoDomain) and domain:
        first = f"failed to get domain '{domain}'"
    elif isinstance(exc, PeerUnavailable) and exc.message.startswith(
        f"unable to connect to {DAEMON} "
    ):
        first = "failed to connect to the hypervisor"
    elif a.command in FAILED_TO:
        first = FAILED_TO[a.command].format(domain=domain, file=getattr(a, "file", ""))
    lines = [f"error: {first}"] if first else []
    return [*lines, f"error: {libvirt_text(exc)}"]


def report_error(a: argparse.Namespace, exc: VmmigrateError) -> None:
    for line in error_lines(a, exc):
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
