"""The hypervisor driver: one emulator process per running domain, controlled over QMP.

Two emulators speak the same QMP subset: real QEMU (``qemu-system-x86_64``) and simvm (our
Python stand-in). Which one runs a domain: its XML's ``<emulator>`` when present, else the
daemon's configured default. A definition runs nothing the host did not allow
(:class:`EmulatorPolicy`): its ``<emulator>`` must be one of the host's emulators,
``<qemu:commandline>`` needs the host's consent (and taints the domain), and emulators may
run as an unprivileged user and group, as libvirt runs QEMU as libvirt-qemu.

Runtime records live in the host state dir (``run/<uuid>.json``, written atomically), so
both daemons of a host can control any running domain, and a restarted daemon reattaches to
running emulators instead of killing them. An emulator runs in a session of its own, so it
outlives the daemon that started it. A record is trusted only while its pid is alive with
the same start time (pids get reused).

An emulator that goes without being asked (it crashed, was killed from outside, or its
guest powered off) is reported once, through ``on_gone``, by the daemon that notices it: its
owner (the daemon that started it, its parent, which collects its exit status), or, once
that daemon is gone (restarted), whichever daemon looks at its record next. A daemon that
stops an emulator on purpose (``quit``, ``kill``) marks it first (``run/<uuid>.stopping``),
so that neither daemon reports that end as unexpected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import grp
import hashlib
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import structlog
from lxml import etree
from vmmigrate.common import qemuargv
from vmmigrate.common.config import DaemonConfig
from vmmigrate.common.disks import domain_disks
from vmmigrate.common.domainxml import DomainDef
from vmmigrate.common.durable import atomic_write, durable_unlink
from vmmigrate.common.errors import (
    ConfigUnsupported,
    HostResourceMissing,
    InvalidArgument,
    OperationFailed,
    OperationInvalid,
    StorageError,
)
from vmmigrate.common.hostpaths import temp_dir, which
from vmmigrate.common.qmp import QMPClient, QMPError, QMPExecuteError

log = structlog.get_logger("vmmigrate.hypervisor")

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
START_TIMEOUT = 20.0
MONITOR_POLL = 0.002  # seconds between looks for a starting emulator's monitor socket
# What may end an incoming migration: QEMU's MIGRATION status changes (completed, failed)
# and the run state leaving inmigrate.
INCOMING_EVENTS = frozenset({"MIGRATION", "STOP", "RESUME", "SHUTDOWN"})
EVENT_SAFETY_POLL = 0.05  # seconds between query-status calls when events are on
# seconds between two looks at every runtime record for emulators gone while their owner was
# not running (each look reads every record: not at every housekeeping tick)
SWEEP_INTERVAL = 5.0
# seconds a start waits for the other daemon to settle a previous emulator's record (it
# does so at its next housekeeping tick, every second)
SETTLE_WAIT = 3.0


@dataclasses.dataclass(frozen=True)
class RuntimeRecord:
    """A running emulator, as both daemons of the host see it."""

    uuid: str
    name: str
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: detects a reused pid
    qmp: str  # unix socket path
    emulator: str  # "simvm" | "qemu"
    argv: tuple[str, ...]
    log: str
    started_unix: float
    incoming: str = ""  # the -incoming URI for a destination emulator
    xml: str = ""  # the live definition (a transient domain has no other)
    # QEMU serves one client per monitor: each daemon gets a monitor of its own (role ->
    # socket), ``qmp`` stays free for tools. simvm serves many clients on one socket.
    monitors: dict[str, str] = dataclasses.field(default_factory=dict)
    # tap devices created for the domain's interfaces (deleted when it stops)
    taps: list[str] = dataclasses.field(default_factory=list)
    # the daemon that started it (its parent: it alone can collect its exit status), by pid
    # and start ticks; 0 in records written before the field existed
    owner_pid: int = 0
    owner_ticks: int = 0

    def monitor_path(self, role: str) -> str:
        return self.monitors.get(role, self.qmp)

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["argv"] = list(self.argv)
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RuntimeRecord:
        d = json.loads(data)
        d["argv"] = tuple(d["argv"])
        return cls(**d)


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_start_ticks(stat)


def stat_start_ticks(stat: str) -> int | None:
    """Field 22 of a /proc/PID/stat line; None once the process is dead: a zombie whose
    threads are all gone (field 20, num_threads, is 1). A killed QEMU's main thread turns
    zombie before its other threads have exited, and those still hold its files: a tap
    deleted then is busy (TUNSETIFF: EBUSY) and stays behind."""
    # the command name may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z" and int(fields[17]) <= 1:
        return None
    return int(fields[19])


GONE_POLL = 0.01  # seconds between looks at an emulator being stopped (without a pidfd)


def _open_pidfd(rec: RuntimeRecord) -> int | None:
    """A pidfd of ``rec``'s emulator (readable once it has exited), or None: no pidfd
    support, or the process is gone (or its pid reused, checked after opening)."""
    try:
        fd = os.pidfd_open(rec.pid)
    except (OSError, AttributeError):
        return None
    if not process_alive(rec):
        os.close(fd)
        return None
    return fd


async def _exited(pidfd: int | None, poll: float) -> None:
    """Until the pidfd's process has exited, or ``poll`` seconds (no pidfd: just those).
    A pidfd stays readable once its process exited: later calls return at once, then a
    moment passes, as the zombie's last threads may still be going."""
    if pidfd is None:
        await asyncio.sleep(poll)
        return
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(pidfd, wake)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, poll)
    finally:
        loop.remove_reader(pidfd)
    if ready.done():
        await asyncio.sleep(0.0005)


def process_alive(rec: RuntimeRecord) -> bool:
    return _start_ticks(rec.pid) == rec.start_ticks


def owner_alive(rec: RuntimeRecord) -> bool:
    """Whether the daemon that started ``rec``'s emulator still runs."""
    return rec.owner_pid > 0 and _start_ticks(rec.owner_pid) == rec.owner_ticks


@dataclasses.dataclass(frozen=True)
class EmulatorExit:
    """How an emulator that nobody asked to stop ended, as far as the daemon that noticed
    it can tell."""

    # Popen's returncode (negative: killed by that signal); None when the emulator was not
    # this daemon's child, whose exit status only its parent could collect
    returncode: int | None
    # its monitor (this daemon's connection to it) sent SHUTDOWN before it went
    shutdown_seen: bool = False

    @property
    def clean(self) -> bool:
        """Whether it shut down rather than failed: exit status 0 (QEMU exits so when its
        guest powers off, or when told to quit or terminate); without a status, libvirt's
        rule: a monitor that closes without a SHUTDOWN event first means a crash."""
        if self.returncode is not None:
            return self.returncode == 0
        return self.shutdown_seen

    def describe(self) -> str:
        code = self.returncode
        if code is None:
            seen = "after" if self.shutdown_seen else "without"
            return f"gone {seen} a SHUTDOWN event (not this daemon's child: no exit status)"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exited with status {code}"


class _Child(NamedTuple):
    """An emulator this process started (and must collect when it exits)."""

    uuid: str
    proc: subprocess.Popen[bytes]


class RunState(enum.StrEnum):
    """A domain's run state: QMP's RunState values (query-status), plus SHUTOFF when no
    emulator runs and UNKNOWN when it does not answer, or answers a state this build does
    not know. A StrEnum: comparisons with the QMP strings keep working."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"
    SHUTOFF = "shutoff"
    UNKNOWN = "unknown"

    @classmethod
    def of(cls, value: object) -> RunState:
        """``value`` (query-status's "status") as a RunState; UNKNOWN if it is none."""
        for state in cls:
            if state.value == value:
                return state
        return cls.UNKNOWN


SIMVM = "simvm"  # how a definition (and the config) names the built-in emulator
TAINT_CUSTOM_ARGV = "custom-argv"  # libvirt's taint flag for <qemu:commandline>


@dataclasses.dataclass(frozen=True)
class EmulatorPolicy:
    """What a definition may make this host run.

    ``allowed``: the values ``<emulator>`` may take (normalized absolute paths, and "simvm");
    ``uid``/``gid``: the identity emulators run as (None: the daemon's own)."""

    allowed: frozenset[str] = frozenset({SIMVM})
    allow_qemu_commandline: bool = False
    uid: int | None = None
    gid: int | None = None

    @property
    def drops_privileges(self) -> bool:
        return self.uid is not None or self.gid is not None


@dataclasses.dataclass(frozen=True)
class EmulatorSettings:
    default: str = "simvm"  # simvm | qemu
    qemu_binary: str = "qemu-system-x86_64"
    qemu_accel: str = "tcg"
    simvm_dirty_rate: int = 0  # pages/s dirtied by simvm's vCPU
    policy: EmulatorPolicy = EmulatorPolicy()
    # <interface type='network'> names one of these (NAME -> host bridge)
    networks: Mapping[str, str] = dataclasses.field(default_factory=dict)
    vnc_ports: tuple[int, int] = (5900, 65535)  # where autoport VNC displays are picked


def is_simvm(path: str) -> bool:
    """Whether ``<emulator>`` names the built-in emulator: "simvm", or a path to its console
    script. Either way the daemon runs its own copy (never the path), so the name says which
    emulator, not which file is executed."""
    return path == SIMVM or os.path.basename(path) == SIMVM


def default_emulators(search_path: str) -> tuple[str, ...]:
    """The allowlist when the config names none: simvm (by name and by its console scripts
    beside the interpreter and in PATH) and every executable qemu-system-* in PATH."""
    found = [SIMVM, str(Path(sys.executable).parent / SIMVM)]
    for entry in search_path.split(os.pathsep):
        if not entry or not os.path.isabs(entry) or not os.path.isdir(entry):
            continue
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(entry)):
                path = os.path.join(entry, name)
                wanted = name.startswith("qemu-system-") or name == SIMVM
                if wanted and os.path.isfile(path) and os.access(path, os.X_OK):
                    found.append(os.path.normpath(path))
    return tuple(dict.fromkeys(found))


def _resolve_identity(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    """(uid, gid) of ``emulator_user``/``emulator_group`` (names or numbers); the group
    defaults to the user's primary group."""
    uid = gid = None
    try:
        if user is not None:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        if group is not None:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        raise InvalidArgument(
            f"emulator_user/emulator_group: no such user or group ({user!r}, {group!r})"
        ) from None
    changes = (uid is not None and uid != os.getuid()) or (gid is not None and gid != os.getgid())
    if changes and os.geteuid() != 0:
        raise InvalidArgument("emulator_user/emulator_group need the daemon to run as root")
    return uid, gid


def policy_from_config(config: DaemonConfig, search_path: str) -> EmulatorPolicy:
    """The host's emulator policy, computed once when the daemon starts."""
    allowed = config.emulators
    if allowed is None:
        allowed = default_emulators(search_path)
    uid, gid = _resolve_identity(config.emulator_user, config.emulator_group)
    return EmulatorPolicy(
        allowed=frozenset(p if p == SIMVM else os.path.normpath(p) for p in allowed),
        allow_qemu_commandline=config.allow_qemu_commandline,
        uid=uid,
        gid=gid,
    )


def _xml_root(d: DomainDef) -> Any:
    # the XML passed parse_domain's hardened parser already: this re-parse cannot expand
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return etree.fromstring(d.xml.encode(), parser)


def has_qemu_commandline(d: DomainDef) -> bool:
    return d.qemu_commandline  # read when the definition was parsed


def check_definition(d: DomainDef, policy: EmulatorPolicy) -> None:
    """Refuse a definition that would run what this host did not allow (define, start and
    Prepare all ask, so that nothing is stored, reserved or started for it)."""
    if d.emulator:
        name = d.emulator if d.emulator == SIMVM else os.path.normpath(d.emulator)
        if name not in policy.allowed:
            raise ConfigUnsupported(f"emulator '{d.emulator}' is not allowed on this host")
    if not policy.allow_qemu_commandline and has_qemu_commandline(d):
        raise ConfigUnsupported(
            "<qemu:commandline> is not allowed on this host (allow_qemu_commandline)"
        )


def emulator_kind(d: DomainDef, default: str) -> str:
    """simvm or qemu: an allowed <emulator> that is not the built-in one is a QEMU binary."""
    if not d.emulator:
        return default
    return "simvm" if is_simvm(d.emulator) else "qemu"


def _qemu_passthrough(d: DomainDef) -> list[str]:
    """libvirt's <qemu:commandline><qemu:arg value='...'/> extension, passed to QEMU."""
    root = _xml_root(d)
    return [a.get("value", "") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]


def simvm_drives(d: DomainDef) -> list[str]:
    """simvm's ``-drive`` options for the domain's disks (file and block, raw): its guest
    writes to them. A cdrom without media has nothing to open; any other disk is refused,
    never dropped."""
    out: list[str] = []
    for disk in domain_disks(d):
        if disk.empty and disk.device == "cdrom":
            continue
        if disk.type not in ("file", "block") or disk.empty:
            raise ConfigUnsupported(
                f"simvm cannot run disk '{disk.target}' of type '{disk.type}' "
                "(file and block disks with a source only)"
            )
        if disk.format not in ("", "raw"):
            raise ConfigUnsupported(
                f"simvm cannot run disk '{disk.target}' of format '{disk.format}' (raw only)"
            )
        opts = [f"file={disk.source.replace(',', ',,')}", "format=raw", "if=virtio"]
        opts.append(f"cache={disk.cache or 'writeback'}")
        if disk.readonly or disk.device == "cdrom":
            opts.append("readonly=on")
        out += ["-drive", ",".join(opts)]
    return out


def memory_plan(d: DomainDef, kind: str) -> qemuargv.MemoryPlan:
    """The domain's memory and balloon, as the emulator ``kind`` runs it: simvm emulates no
    balloon device, whatever the XML says."""
    plan = qemuargv.memory_plan(d)
    return plan if kind == "qemu" else dataclasses.replace(plan, balloon=False)


MONITOR_ROLES = ("srcd", "dstd")


def monitor_paths(kind: str, qmp: str) -> dict[str, str]:
    """QEMU serves one client per monitor: one extra monitor per daemon role."""
    if kind != "qemu":
        return {}
    base = qmp.removesuffix(".qmp")
    return {role: f"{base}.{role}.qmp" for role in MONITOR_ROLES}


def qemu_binary(d: DomainDef, settings: EmulatorSettings) -> str:
    """The QEMU binary that runs ``d`` here (its <emulator>, else ``qemu_binary`` looked up
    in PATH), refused with libvirt's text when it is not an executable file."""
    binary = d.emulator or settings.qemu_binary
    found = which(binary)  # an absolute path is checked as it is
    if found is None:
        why = "Permission denied" if os.path.isfile(binary) else "No such file or directory"
        raise HostResourceMissing(f"Cannot find QEMU binary {binary}: {why}")
    return found


def qemu_facts(d: DomainDef, settings: EmulatorSettings, qmp: str) -> qemuargv.HostFacts:
    """What the host adds to ``d``'s XML for QEMU: console log and channel sockets beside
    the monitors (in the socket dir, which an unprivileged emulator may write to)."""
    base = qmp.removesuffix(".qmp")
    return qemuargv.HostFacts(
        binary=qemu_binary(d, settings),
        accel=settings.qemu_accel,
        monitors=(qmp, *monitor_paths("qemu", qmp).values()),
        console_log=f"{base}.console.log",
        channel_prefix=f"{base}.ch",
        networks=settings.networks,
    )


def build_argv(
    d: DomainDef,
    kind: str,
    settings: EmulatorSettings,
    qmp: str,
    *,
    paused: bool,
    incoming: str | None,
    vnc_port: int | None = None,
) -> list[str]:
    tail = ["-S"] if paused or incoming else []
    if incoming:
        tail += ["-incoming", incoming]
    if kind == "qemu":
        facts = dataclasses.replace(qemu_facts(d, settings, qmp), vnc_port=vnc_port)
        return [*qemuargv.build_argv(d, facts), *tail, *_qemu_passthrough(d)]
    mib = max(d.memory_kib // 1024, 1)
    common = [
        "-name",
        d.name,
        "-uuid",
        d.uuid,
        "-m",
        str(mib),
        "-smp",
        str(d.vcpus),
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    # the daemon's own interpreter and package: the XML's path is a name, never run
    head = [sys.executable, "-m", "vmmigrate.simvm"]
    extra = ["-dirty-rate", str(settings.simvm_dirty_rate)] if settings.simvm_dirty_rate else []
    return head + common + tail + extra + simvm_drives(d)


# A unix socket path holds at most 107 bytes; "<uuid>.srcd.qmp" takes 46 of them.
_MAX_SOCKET_DIR = 60


def socket_dir_for(run_dir: Path, emulator_gid: int | None = None) -> Path:
    """Where the QMP sockets (and the incoming unix sockets) go: the run dir itself, or,
    when its path is too long for a unix socket, a private directory under the system temp
    dir named after it.

    Emulators that run as another user and group (``emulator_gid``) get a directory of
    their own under the temp dir instead, owned by the daemon and writable by that group
    alone: they create their sockets there without reaching the state dir, which may sit
    under a directory they cannot enter and holds what they must not touch (the records)."""
    if emulator_gid is None and len(os.fsencode(run_dir)) <= _MAX_SOCKET_DIR:
        return run_dir
    digest = hashlib.sha256(os.fsencode(run_dir.resolve())).hexdigest()[:16]
    suffix = "" if emulator_gid is None else "-emu"
    d = Path(temp_dir()) / f"vmmigrate-{digest}{suffix}"
    d.mkdir(mode=0o700, exist_ok=True)
    # The temp dir is everyone's: a directory someone else made (or a symlink) in its place
    # must not become where emulators' monitors are.
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OperationFailed(f"socket directory {d} is not a directory owned by this daemon")
    if emulator_gid is not None:
        os.chown(d, -1, emulator_gid)
        os.chmod(d, 0o770)
    return d


def _delete_taps(taps: list[str]) -> None:
    for tap in taps:
        qemuargv.delete_tap(tap)


def _open_log(logfile: str) -> int:
    # root's file, handed to the emulator as its stdout/stderr: it never opens it by name
    return os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def mark_tainted(d: DomainDef, logfile: str, reason: str) -> None:
    """Our equivalent of libvirt's "Domain id=N is tainted: custom-argv" line, written to
    the domain's emulator log before the emulator starts (and in the daemon's log)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S%z")
    line = f"{when}: domain '{d.name}' (uuid {d.uuid}) is tainted: {reason}\n"
    fd = _open_log(logfile)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    log.warning("domain_tainted", domain=d.name, uuid=d.uuid, taint=reason)


def _spawn(
    argv: list[str],
    logfile: str,
    policy: EmulatorPolicy,
    cpus: frozenset[int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start an emulator in a session of its own (it outlives the daemon), as the policy's
    user and group, with no supplementary groups (the daemon's are root's), confined to the
    host CPUs ``cpus`` (<vcpu cpuset>) when given.

    The identity is changed by util-linux's setpriv in the child, not by Popen's user= and
    group=: those make Python fork() the daemon (no vfork), and gRPC's fork handlers then
    restart its threads in the child, which crashed there (SIGSEGV in the event engine)
    before the exec. The CPUs are set the same way (util-linux's taskset, which then execs
    the emulator), so that every thread the emulator starts inherits them, as libvirt sets
    them before QEMU's exec."""
    cwd: str | None = None
    if cpus is not None:
        taskset = which("taskset") or "/usr/bin/taskset"
        argv = [taskset, "--cpu-list", ",".join(str(c) for c in sorted(cpus)), *argv]
    if policy.drops_privileges:
        setpriv = which("setpriv") or "/usr/bin/setpriv"
        argv = [
            setpriv,
            f"--reuid={policy.uid}",
            f"--regid={policy.gid}",
            "--clear-groups",
            "--",
            *argv,
        ]
        cwd = "/"
    fd = _open_log(logfile)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
            cwd=cwd,
        )
    except OSError as exc:
        raise OperationFailed(f"cannot start emulator {argv[0]}: {exc}") from exc
    finally:
        os.close(fd)


class QMPHypervisor:
    """Starts emulators and talks QMP to them; runtime records in ``run_dir``."""

    def __init__(self, run_dir: Path, settings: EmulatorSettings, role: str = "srcd") -> None:
        self.role = role
        self.run_dir = run_dir
        self.settings = settings
        run_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir = socket_dir_for(run_dir, self.emulator_gid())
        self._monitors: dict[str, QMPClient] = {}
        self._children: dict[int, _Child] = {}
        self._connect_locks: dict[str, asyncio.Lock] = {}
        self._ticks = _start_ticks(os.getpid()) or 0  # this daemon, as records name owners
        self._swept = 0.0  # monotonic time of the last look at every record (sweep)
        # called once for each emulator that went without being asked (the daemon sends
        # its lifecycle event); set by the daemon
        self.on_gone: Callable[[RuntimeRecord, EmulatorExit], None] | None = None

    def emulator_gid(self) -> int | None:
        """The group emulators' socket directory is writable by (None: the daemon's)."""
        policy = self.settings.policy
        if not policy.drops_privileges:
            return None
        return policy.gid if policy.gid is not None else os.getgid()

    def check_definition(self, d: DomainDef) -> None:
        check_definition(d, self.settings.policy)
        if emulator_kind(d, self.settings.default) == "qemu":
            # what QEMU's command line cannot carry is refused before anything is kept,
            # reserved or started (libvirt: unsupported configuration)
            qemuargv.check_supported(d, self.settings.qemu_accel)

    # ---------------------------------------------------------------- records

    def _path(self, uuid: str) -> Path:
        return self.run_dir / f"{uuid}.json"

    def _load(self, uuid: str) -> RuntimeRecord | None:
        """The record of ``uuid`` as it is on disk (alive or not)."""
        try:
            return RuntimeRecord.from_json(self._path(uuid).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("runtime_record_unreadable", uuid=uuid)
            return None

    def record(self, uuid: str) -> RuntimeRecord | None:
        """The live record of ``uuid``; a stale one (process gone) is settled (_ended)."""
        rec = self._load(uuid)
        if rec is None:
            return None
        if process_alive(rec):
            return rec
        self._ended(rec)
        return None

    def records(self) -> list[RuntimeRecord]:
        out = []
        for p in sorted(self.run_dir.glob("*.json")):
            rec = self.record(p.stem)
            if rec is not None:
                out.append(rec)
        return out

    def _owns(self, rec: RuntimeRecord) -> bool:
        return rec.owner_pid == os.getpid() and rec.owner_ticks == self._ticks

    def _ended(self, rec: RuntimeRecord) -> None:
        """``rec``'s emulator is gone. Its owner collects it and reports how it ended; any
        other daemon leaves it to that owner while it runs (the record stays until then:
        the domain reads as shut off meanwhile), and settles it itself once it does not."""
        if self._owns(rec):
            # collected here; one still starting is not a child yet: start() cleans up
            self.reap()
        elif not owner_alive(rec):
            mon = self._monitors.get(rec.uuid)
            self._gone(rec, EmulatorExit(None, mon is not None and mon.shutdown_seen))

    def _gone(self, rec: RuntimeRecord, how: EmulatorExit) -> None:
        """Settle the record of an emulator that is gone, and report its end (on_gone)
        unless a daemon asked for it, or another daemon settled it first."""
        asked = self._stop_marked(rec)
        if not self.forget(rec) or asked:
            return
        if how.clean:
            log.info("emulator_exited", domain=rec.name, pid=rec.pid, how=how.describe())
        else:
            # libvirt: "closed without SHUTDOWN event; assuming the domain crashed"
            log.warning("emulator_failed", domain=rec.name, pid=rec.pid, how=how.describe())
        if self.on_gone is not None:
            self.on_gone(rec, how)

    def _stop_path(self, uuid: str) -> Path:
        return self.run_dir / f"{uuid}.stopping"

    def _mark_stopping(self, rec: RuntimeRecord) -> None:
        """Before stopping ``rec``'s emulator on purpose: its end is not to be reported as
        unexpected, by this daemon or the other (the caller reports it as what it is:
        destroyed, shut down, migrated). Not durable: a mark lost in a crash costs at worst
        one "Stopped Failed" too many."""
        try:
            atomic_write(self._stop_path(rec.uuid), str(rec.pid).encode(), durable=False)
        except StorageError as exc:  # the stop itself must not fail on it
            log.warning("stop_mark_not_written", uuid=rec.uuid, error=str(exc))

    def _stop_marked(self, rec: RuntimeRecord) -> bool:
        try:
            return self._stop_path(rec.uuid).read_text().strip() == str(rec.pid)
        except (OSError, ValueError):
            return False

    def forget(self, rec: RuntimeRecord) -> bool:
        """Clean up after ``rec``'s emulator: its record, monitor connection, sockets, taps
        and stop mark. Returns whether this call removed the record (False: it was gone
        already). A record that names another emulator of the domain (started since) is
        left alone, and so are that emulator's sockets and taps."""
        current = self._load(rec.uuid)
        if current is not None and current.pid != rec.pid:
            return False
        removed = current is not None and durable_unlink(self._path(rec.uuid))
        mon = self._monitors.pop(rec.uuid, None)
        if mon is not None:
            with contextlib.suppress(RuntimeError):  # no loop: nothing to close
                asyncio.get_running_loop().create_task(mon.close())
        for path in (rec.qmp, *rec.monitors.values(), str(self._stop_path(rec.uuid))):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if rec.emulator == "qemu":
            for channel in Path(rec.qmp).parent.glob(Path(rec.qmp).stem + ".ch*"):
                with contextlib.suppress(OSError):
                    channel.unlink()
        _delete_taps(rec.taps)
        return removed

    def reap(self) -> None:
        """Collect exited children (emulators this process started); the end of one that
        nobody asked to stop is reported with its exit status."""
        for pid, child in list(self._children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self._children[pid]
            rec = self._load(child.uuid)
            if rec is not None and rec.pid == pid:
                mon = self._monitors.get(rec.uuid)
                self._gone(rec, EmulatorExit(code, mon is not None and mon.shutdown_seen))

    def sweep(self, every: float = SWEEP_INTERVAL) -> None:
        """Collect this daemon's exited children; and at most every ``every`` seconds, look
        at every record, to settle (and report) emulators whose owner is gone: those a
        restarted daemon started, which no daemon collects."""
        self.reap()
        now = time.monotonic()
        if now - self._swept >= every:
            self._swept = now
            self.records()

    async def _settled(self, uuid: str) -> None:
        """Before a start replaces it: the record of a previous emulator of ``uuid`` that
        is gone but not yet settled by its owner (the other daemon collects it within a
        housekeeping tick) is given that time, then settled here, so that its end is
        reported and its taps and sockets are cleaned before the new emulator takes them."""
        deadline = time.monotonic() + SETTLE_WAIT
        while (rec := self._load(uuid)) is not None and not process_alive(rec):
            if time.monotonic() >= deadline:
                mon = self._monitors.get(uuid)
                self._gone(rec, EmulatorExit(None, mon is not None and mon.shutdown_seen))
                return
            self._ended(rec)
            await asyncio.sleep(0.05)

    # ---------------------------------------------------------------- lifecycle

    async def start(
        self, d: DomainDef, *, paused: bool = False, incoming: str | None = None
    ) -> RuntimeRecord:
        if self.record(d.uuid) is not None:
            raise OperationInvalid("domain is already running")
        await self._settled(d.uuid)
        # the policy may have changed since the definition was stored
        self.check_definition(d)
        kind = emulator_kind(d, self.settings.default)
        qmp = str(self.socket_dir / f"{d.uuid}.qmp")
        logfile = str(self.run_dir / f"{d.uuid}.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp)
        # the argv first: a definition it refuses leaves nothing behind (no tap, no process)
        argv = await self._argv(d, kind, qmp, paused=paused, incoming=incoming)
        live = qemuargv.live_xml(d) if kind == "qemu" else d.xml
        if has_qemu_commandline(d):
            await asyncio.to_thread(mark_tainted, d, logfile, TAINT_CUSTOM_ARGV)
        taps = await asyncio.to_thread(self._prepare_qemu, d) if kind == "qemu" else []
        try:
            cpus = qemuargv.host_cpus(d) if kind == "qemu" else None
            spawned = time.monotonic()
            proc = await asyncio.to_thread(_spawn, argv, logfile, self.settings.policy, cpus)
        except BaseException:
            await asyncio.to_thread(_delete_taps, taps)
            raise
        rec = RuntimeRecord(
            uuid=d.uuid,
            name=d.name,
            pid=proc.pid,
            start_ticks=_start_ticks(proc.pid) or 0,
            qmp=qmp,
            emulator=kind,
            argv=tuple(argv),
            log=logfile,
            started_unix=time.time(),
            incoming=incoming or "",
            xml=live,
            monitors=monitor_paths(kind, qmp),
            taps=taps,
            owner_pid=os.getpid(),
            owner_ticks=self._ticks,
        )
        try:
            # The record first: if this daemon dies while the emulator boots, its successor
            # (or the other daemon of the host) finds the emulator and can stop it.
            await asyncio.to_thread(atomic_write, self._path(d.uuid), rec.to_json())
            await self._wait_monitor(rec, proc)
            startup = time.monotonic() - spawned  # the emulator's own: exec to its monitor
            await self._initial_memory(d, rec)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            self.forget(rec)
            raise
        # a child from now on: its end is collected (reap) and, if unasked, reported; not
        # before, so that a failed start is not reported as a domain that stopped
        self._children[proc.pid] = _Child(d.uuid, proc)
        log.info(
            "emulator_started",
            domain=d.name,
            pid=proc.pid,
            emulator=kind,
            incoming=incoming or None,
            startup_ms=round(startup * 1e3, 1),
        )
        return rec

    async def _initial_memory(self, d: DomainDef, rec: RuntimeRecord) -> None:
        """libvirt's initial memory amount: QEMU runs with -m <memory>, then the balloon's
        target is set to <currentMemory> (QMP ``balloon``, in bytes). Never for an incoming
        migration: the balloon's target and size arrive with the guest's state. Without a
        balloon device (simvm has none) <currentMemory> cannot hold and the guest has all
        of <memory>, as under libvirt; a warning names it."""
        if rec.incoming:
            return
        plan = memory_plan(d, rec.emulator)
        if plan.current_ignored:
            log.warning(
                "current_memory_ignored",
                domain=d.name,
                current_memory_kib=plan.current_kib,
                memory_kib=plan.memory_kib,
                reason="<currentMemory> below <memory> needs <memballoon model='virtio'> "
                "(QEMU); the guest has all of <memory>",
            )
        target = plan.balloon_target_kib
        if target is not None:
            await self.execute(d.uuid, "balloon", {"value": target * 1024})
            log.info("balloon_target_set", domain=d.name, current_memory_kib=target)

    async def _argv(
        self, d: DomainDef, kind: str, qmp: str, *, paused: bool, incoming: str | None
    ) -> list[str]:
        vnc_port = None
        if kind == "qemu" and qemuargv.needs_vnc_port(d):
            vnc_port = await asyncio.to_thread(qemuargv.pick_vnc_port, *self.settings.vnc_ports)
        return build_argv(
            d, kind, self.settings, qmp, paused=paused, incoming=incoming, vnc_port=vnc_port
        )

    def _prepare_qemu(self, d: DomainDef) -> list[str]:
        """The taps of the domain's bridged interfaces; returns those created here (deleted
        when it stops)."""
        policy = self.settings.policy
        created: list[str] = []
        try:
            for tap, bridge in qemuargv.planned_taps(d, self.settings.networks):
                if qemuargv.create_tap(tap, bridge, policy.uid):
                    created.append(tap)
        except BaseException:
            _delete_taps(created)
            raise
        return created

    async def _wait_monitor(self, rec: RuntimeRecord, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise OperationFailed(
                    f"emulator for domain '{rec.name}' exited with status {proc.returncode}: "
                    f"{self.log_tail(rec)}"
                )
            path = rec.monitor_path(self.role)
            if os.path.exists(path):  # noqa: ASYNC240 - one stat of a local socket path
                mon = QMPClient(rec.name)
                try:
                    await mon.connect(path, timeout=5)
                except QMPError:
                    await asyncio.sleep(0.02)
                    continue
                self._monitors[rec.uuid] = mon
                return
            # Prepare waits here for the incoming emulator (QEMU opens its monitor within
            # a few ms of starting, then spends ~350 ms on RAM): a short poll, one stat each.
            await asyncio.sleep(MONITOR_POLL)
        raise OperationFailed(f"emulator for domain '{rec.name}' did not open its monitor")

    def log_tail(self, rec: RuntimeRecord, limit: int = 400) -> str:
        try:
            data = Path(rec.log).read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip().splitlines()[-1] if data.strip() else ""

    async def monitor(self, uuid: str) -> QMPClient:
        rec = self.record(uuid)
        if rec is None:
            raise OperationInvalid("domain is not running")
        lock = self._connect_locks.setdefault(uuid, asyncio.Lock())
        async with lock:
            mon = self._monitors.get(uuid)
            if mon is not None and mon.runstate.value == "running":
                return mon
            mon = QMPClient(rec.name)
            await mon.connect(rec.monitor_path(self.role))
            self._monitors[uuid] = mon
            return mon

    async def execute(
        self,
        uuid: str,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> Any:
        mon = await self.monitor(uuid)
        return await mon.execute(command, arguments, timeout=timeout)

    async def status(self, uuid: str) -> RunState:
        """QMP run state, or SHUTOFF when no emulator runs."""
        if self.record(uuid) is None:
            return RunState.SHUTOFF
        try:
            r = await self.execute(uuid, "query-status")
        except QMPError:
            return RunState.SHUTOFF if self.record(uuid) is None else RunState.UNKNOWN
        return RunState.of(r.get("status"))

    async def wait_incoming(self, uuid: str, until: float, poll: float) -> RunState:
        """Wait until an incoming emulator leaves "inmigrate" (or ``until``, a monotonic
        time, passes); returns its run state then ("shutoff" when it went away).

        The guest stays paused until this returns, so it reacts to the emulator's own
        events (MIGRATION, with the "events" capability turned on here; STOP/RESUME) within
        a QMP round trip, instead of a poll interval. query-status decides; an event only
        says "ask now". Without events (the capability refused) it polls every ``poll``
        seconds; with them, a slow poll remains as a safety net (a lost monitor sends none).
        QEMU's own MIGRATION "completed" decides by itself: QEMU sends it only once the run
        state has left "inmigrate" (process_incoming_migration_bh), so the query's round
        trip is spared while the guest waits.
        """
        rec = self.record(uuid)
        if rec is None:
            return RunState.SHUTOFF
        mon = await self.monitor(uuid)
        wake = asyncio.Event()
        done: list[bool] = []

        def on_event(e: dict[str, Any]) -> None:
            if e.get("event") not in INCOMING_EVENTS:
                return
            completed = (e.get("data") or {}).get("status") == "completed"
            if rec.emulator == "qemu" and e.get("event") == "MIGRATION" and completed:
                done.append(True)
            wake.set()

        unsubscribe = mon.on_event(on_event)
        try:
            interval = poll
            if await self.migration_events(uuid):
                interval = max(poll, EVENT_SAFETY_POLL)
            while True:
                wake.clear()  # before asking: an event during the query is not lost
                if done:
                    return RunState.PAUSED
                status = await self.status(uuid)
                if status != RunState.INMIGRATE or time.monotonic() >= until:
                    return status
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(interval, max(until - time.monotonic(), 0))):
                        await wake.wait()
        finally:
            unsubscribe()

    async def migration_events(self, uuid: str) -> bool:
        """Turn on the emulator's MIGRATION events (once per monitor connection); False
        when the emulator refuses them. Prepare does it for an incoming emulator, so that
        Finish, with the guest paused, does not spend a round trip on it."""
        mon = await self.monitor(uuid)
        if not mon.migration_events:
            with contextlib.suppress(QMPExecuteError):
                await mon.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
                mon.migration_events = True
        return mon.migration_events

    async def quit(self, uuid: str, timeout: float = 10.0) -> None:
        """Ask the emulator to quit; kill it if it does not."""
        rec = self.record(uuid)
        if rec is None:
            return
        self._mark_stopping(rec)
        with contextlib.suppress(QMPError):
            await self.execute(uuid, "quit", timeout=timeout)
        await self._wait_gone(rec, timeout)

    async def kill(self, uuid: str) -> None:
        rec = self.record(uuid)
        if rec is None:
            return
        self._mark_stopping(rec)
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
        await self._wait_gone(rec, 10.0)

    def kill_strays(self, uuid: str) -> int:
        """Kill emulators of ``uuid`` that this host started but has no record of (the
        daemon died between starting one and writing its record): found by their monitor
        socket, which names this host's socket directory and the domain. Returns how many."""
        qmp = str(self.socket_dir / f"{uuid}.qmp")
        known = self.record(uuid)
        killed = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or (known is not None and int(entry) == known.pid):
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if qmp.encode() in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
                killed += 1
                log.warning("stray_emulator_killed", uuid=uuid, pid=int(entry))
        return killed

    async def stop_migrated(self, uuid: str) -> None:
        """Stop the source emulator of a live migration that succeeded: the guest runs on
        the destination now and nothing of this emulator is to be saved (its disks were
        released when the stream completed), so it is killed outright (SIGKILL), without
        the monitor round trip and the emulator's own clean-up of ``quit``.

        Once SIGKILL is sent the process never runs again, so the domain is shut off here
        from then on: the record is settled at once and the kernel frees the emulator's
        memory in the background (tens of ms for a 512 MiB guest; its parent collects it).
        An emulator with taps is waited for: a tap is busy until every thread is gone."""
        rec = self.record(uuid)
        if rec is None:
            return
        if rec.taps:
            await self.kill(uuid)
            return
        self._mark_stopping(rec)  # its end, seen by either daemon, is not a failure
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
        self.reap()
        self.forget(rec)

    async def _wait_gone(self, rec: RuntimeRecord, timeout: float) -> None:
        """Until ``rec``'s emulator has exited (its memory freed: a 512 MiB guest's takes
        tens of ms), woken by its pidfd when the kernel has one (else every 10 ms)."""
        deadline = time.monotonic() + timeout
        pidfd = _open_pidfd(rec)
        try:
            while process_alive(rec):
                self.reap()
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rec.pid, signal.SIGKILL)
                    deadline = time.monotonic() + timeout
                await _exited(pidfd, GONE_POLL)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        self.reap()
        self.forget(rec)

    async def close(self) -> None:
        """Drop monitor connections; emulators keep running (a restarted daemon reattaches)."""
        for mon in list(self._monitors.values()):
            await mon.close()
        self._monitors.clear()


def hypervisor_for(config: DaemonConfig, role: str) -> QMPHypervisor:
    """The driver both daemons of a host build over the shared state dir (``role``: which
    of the emulator's monitors this daemon uses), with the host's emulator policy (its
    default allowlist is what PATH holds now, at the daemon's start)."""
    policy = policy_from_config(config, os.environ.get("PATH", os.defpath))
    return QMPHypervisor(
        config.state_dir / "run",
        EmulatorSettings(
            default=config.emulator,
            qemu_binary=config.qemu_binary,
            qemu_accel=config.qemu_accel,
            policy=policy,
            networks=config.networks,
            vnc_ports=config.vnc_ports,
        ),
        role=role,
    )
