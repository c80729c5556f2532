"""Whether this host can run a domain: asked before anything is reserved or started (dstd's
live Prepare, srcd's start), so that a domain this host cannot run is refused with a clear
error instead of a reservation, a half-started emulator and QEMU's stderr (libvirt checks
the same at start: qemuProcessStartValidate and the storage and network set-up after it).

The checks, in this order (docs/ARCHITECTURE.md section 4, "Can this host run it"):

1. the emulator: allowed by the host's policy, and for QEMU the binary installed;
2. QEMU only: the machine type is one the binary offers (``-machine help``, aliases
   included), and the CPU model is one it knows (``-cpu help``), after the mapping of
   host-passthrough / host-model that qemuargv applies (with its refusals); every host
   CPU ``<vcpu cpuset>`` pins the emulator to is online;
3. every disk with a source (file or block; simvm opens its disks too, so this applies to
   both emulators): on shared storage the file or device must exist; a disk the migration
   copies here (``copied``: target -> capacity in bytes) needs its directory, with room;
4. QEMU only: every bridge an interface is plugged into exists (``<interface
   type='bridge'>``, and ``type='network'`` through the host's ``networks`` table).

simvm ignores ``<os><type machine>``, ``<cpu>`` and ``<interface>`` (it takes the name,
UUID, memory, vCPUs and disks: hypervisor.build_argv), so their checks run for QEMU only.

Nothing here changes anything. QEMU's answers are asked once per binary (path, mtime and
size) in the process, so a migration pays for a ``stat`` and a dictionary lookup; each
daemon asks the host's default QEMU binary once at start, in the background
(:func:`offers_warmed`), as libvirt probes its QEMU binaries when its driver starts, so
that the first Prepare or start after a restart does not wait the ~100 ms of the two probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import structlog
from lxml import etree
from vmmigrate.common import qemuargv
from vmmigrate.common.disks import Disk, domain_disks
from vmmigrate.common.domainxml import DomainDef
from vmmigrate.common.errors import (
    ConfigUnsupported,
    HostResourceMissing,
    InvalidArgument,
    NoNetwork,
    OperationFailed,
    OperationInvalid,
    StorageFull,
    XMLError,
)
from vmmigrate.common.hostpaths import which
from vmmigrate.common.hypervisor import (
    EmulatorSettings,
    check_definition,
    emulator_kind,
    qemu_binary,
)
from vmmigrate.common.xmlsafe import parse_untrusted

log = structlog.get_logger("vmmigrate.hostcheck")

SYS_ROOT = Path("/sys")
NO_COPIES: Mapping[str, int] = MappingProxyType({})
PROBE_TIMEOUT = 30.0  # seconds for one `QEMU -machine help` (it answers in ~20 ms)
DEFAULT_MACHINE = "pc"  # qemuargv's default when <type> names none
# Linux's rule for an interface name (dev_valid_name): what is looked up under /sys
_IFNAME = re.compile(r"[^/:\s]{1,15}")


# ------------------------------------------------------------------------ QEMU's answers


@dataclasses.dataclass(frozen=True)
class QemuOffer:
    """What one QEMU binary offers: machine types (each name, aliases included, to the
    machine it is) and CPU models (aliases included)."""

    machines: Mapping[str, str]
    cpus: frozenset[str]


_ALIAS = re.compile(r"\(alias of ([^)\s]+)\)")


def parse_machine_help(text: str) -> dict[str, str]:
    """``-machine help``'s lines ("NAME  DESCRIPTION [(alias of OTHER)]") after its header,
    as name -> the machine it is (itself, or what it is an alias of)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split(None, 1)
        if not fields or line[0].isspace() or line.startswith("Supported machines"):
            continue
        alias = _ALIAS.search(fields[1]) if len(fields) > 1 else None
        out[fields[0]] = alias.group(1) if alias else fields[0]
    return out


def parse_cpu_help(text: str) -> frozenset[str]:
    """The model names of ``-cpu help`` ("x86 NAME  DESCRIPTION" lines, up to the blank line
    before the CPUID flags)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("Available CPUs"):
            continue
        fields = line.split()
        if not fields:
            break  # the CPUID flags follow
        if fields[0] == "x86" and len(fields) > 1:
            names.add(fields[1])
    return frozenset(names)


_offers: dict[tuple[str, int, int], QemuOffer] = {}
_offers_lock = threading.Lock()


def _ask(binary: str, what: str) -> str:
    try:
        r = subprocess.run(
            [binary, what, "help"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationFailed(f"cannot run '{binary} {what} help': {exc}") from exc
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise OperationFailed(f"'{binary} {what} help' failed ({r.returncode}): {tail}")
    return r.stdout


def qemu_offer(binary: str) -> QemuOffer:
    """What ``binary`` offers, asked once per (path, mtime, size) in this process: an
    upgraded binary is asked again, a failed probe is not remembered."""
    try:
        st = os.stat(binary)
    except OSError as exc:  # gone since qemu_binary looked
        raise HostResourceMissing(f"Cannot find QEMU binary {binary}: {exc.strerror}") from None
    key = (binary, st.st_mtime_ns, st.st_size)
    with _offers_lock:
        found = _offers.get(key)
    if found is not None:
        return found
    offer = QemuOffer(
        machines=MappingProxyType(parse_machine_help(_ask(binary, "-machine"))),
        cpus=parse_cpu_help(_ask(binary, "-cpu")),
    )
    with _offers_lock:
        for old in [k for k in _offers if k[0] == binary]:
            del _offers[old]  # the binary changed: its old answers go
        _offers[key] = offer
    return offer


def warm_qemu_offer(settings: EmulatorSettings) -> str | None:
    """Ask the host's default QEMU binary (``qemu_binary`` in PATH) what it offers, when it
    is installed and allowed; the binary asked, or None."""
    binary = which(settings.qemu_binary)
    if binary is None or os.path.normpath(binary) not in settings.policy.allowed:
        return None
    qemu_offer(binary)
    return binary


async def _warm(settings: EmulatorSettings, after: Callable[[], None]) -> None:
    started = time.monotonic()
    try:
        binary = await asyncio.to_thread(warm_qemu_offer, settings)
    except Exception as exc:  # asked again when a domain needs it, and refused then
        log.warning("qemu_probe_failed", error=str(exc))
        return
    if binary is not None:
        log.info("qemu_probed", binary=binary, ms=round((time.monotonic() - started) * 1e3, 1))
        after()


@contextlib.asynccontextmanager
async def offers_warmed(
    settings: EmulatorSettings, after: Callable[[], None] = lambda: None
) -> AsyncIterator[None]:
    """While the daemon serves: the default QEMU binary's answers asked once, in the
    background (the daemon is ready before they are; a domain that needs them first waits
    for its own probe, as before); ``after`` runs once they are in (the daemons give the
    probe's freed memory back)."""
    task = asyncio.ensure_future(_warm(settings, after))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------------ the checks


def check_runnable(
    d: DomainDef,
    settings: EmulatorSettings,
    *,
    copied: Mapping[str, int] = NO_COPIES,
    sys_root: Path = SYS_ROOT,
) -> None:
    """Refuse ``d`` if this host cannot run it (see the module docstring for the order).

    ``copied``: the disks (target -> capacity in bytes) a storage-copy migration writes
    here; the others are shared storage and must be here already. ``sys_root``: where
    sysfs is (tests give a directory of their own)."""
    check_definition(d, settings.policy)
    qemu = emulator_kind(d, settings.default) == "qemu"
    # parse_domain's hardened parser accepted this XML already: the re-parse cannot expand
    root = parse_untrusted(d.xml, what="domain XML", max_bytes=len(d.xml) * 4 + 1, error=XMLError)
    if qemu:
        binary = qemu_binary(d, settings)
        offer = qemu_offer(binary)
        check_machine(root, binary, offer)
        check_cpu(root, offer, settings.qemu_accel)
        check_host_cpus(root, sys_root)
    check_disks(domain_disks(d), copied)
    if qemu:
        check_bridges(root, settings.networks, sys_root)


def check_machine(root: etree._Element, binary: str, offer: QemuOffer) -> None:
    type_el = root.find("os/type")
    machine = DEFAULT_MACHINE if type_el is None else type_el.get("machine", DEFAULT_MACHINE)
    if machine not in offer.machines:
        raise ConfigUnsupported(f"Emulator '{binary}' does not support machine type '{machine}'")


def check_cpu(root: etree._Element, offer: QemuOffer, accel: str) -> None:
    cpu = root.find("cpu")
    if cpu is None:
        return
    mode = cpu.get("mode", "custom")
    model = (cpu.findtext("model") or "").strip()
    if mode == "custom" and model and model not in offer.cpus:
        raise ConfigUnsupported(f"CPU model {model} is not supported by hypervisor")
    # host-passthrough / host-model as QEMU's command line will name them (max under TCG)
    name = qemuargv.cpu_model(cpu, accel)
    if name is not None and name not in offer.cpus:
        type_el = root.find("os/type")
        arch = "x86_64" if type_el is None else type_el.get("arch", "x86_64")
        virt = "kvm" if accel == "kvm" else "qemu"
        raise ConfigUnsupported(
            f"CPU mode '{mode}' for {arch} {virt} domain on {os.uname().machine} host is not "
            f"supported by hypervisor (its QEMU has no CPU model '{name}')"
        )


def check_host_cpus(root: etree._Element, sys_root: Path = SYS_ROOT) -> None:
    """``<vcpu cpuset>``: every host CPU it names is online here (the emulator is pinned
    to them: hypervisor._spawn)."""
    cpus = qemuargv.host_cpus(root)
    if cpus is None:
        return
    path = sys_root / "devices" / "system" / "cpu" / "online"
    try:
        text = path.read_text().strip()
        online = qemuargv.parse_cpuset(text)
    except (OSError, XMLError):
        return  # no sysfs to ask: the pinning itself fails the start, with its reason
    missing = sorted(cpus - online)
    if missing:
        raise HostResourceMissing(
            f"host CPU {missing[0]} named by <vcpu cpuset> is not online on this host "
            f"(online: {text})"
        )


def check_disks(disks: Sequence[Disk], copied: Mapping[str, int] = NO_COPIES) -> None:
    """Every disk with a source: on shared storage it must be here; a copied one needs its
    directory and ``copied[target]`` bytes free there."""
    targets = {disk.target for disk in disks}
    for target, capacity in copied.items():
        if target not in targets:
            raise InvalidArgument(f"disk target {target} not found")
        if capacity < 0:
            raise InvalidArgument(f"disk {target}: capacity {capacity} is negative")
    for disk in disks:
        if disk.empty or disk.type not in ("file", "block"):
            continue  # no media (a cdrom), or not a path (refused by name where it runs)
        if disk.target in copied and disk.type == "file":
            _check_room(disk, copied[disk.target])
        else:
            _check_exists(disk.source)


def _check_exists(path: str) -> None:
    try:
        os.stat(path)
    except OSError as exc:
        raise HostResourceMissing(
            f"Cannot access storage file '{path}': {os.strerror(exc.errno or 0)}"
        ) from None


def _check_room(disk: Disk, capacity: int) -> None:
    parent = os.path.dirname(os.path.abspath(disk.source))
    try:
        st = os.statvfs(parent)
    except OSError as exc:
        raise HostResourceMissing(
            f"Cannot access directory '{parent}' of storage file '{disk.source}' (disk "
            f"'{disk.target}', copied by the migration): {os.strerror(exc.errno or 0)}"
        ) from None
    free = st.f_bavail * st.f_frsize
    if free < capacity:
        raise StorageFull(
            f"not enough free space for disk '{disk.target}' at '{disk.source}': it needs "
            f"{capacity} bytes, '{parent}' has {free} bytes free"
        )


def check_bridges(
    root: etree._Element, networks: Mapping[str, str], sys_root: Path = SYS_ROOT
) -> None:
    """The bridge of every ``bridge`` and ``network`` interface exists here (the other
    interface types attach to no bridge)."""
    for nic in root.iterfind("devices/interface"):
        kind = nic.get("type", "")
        src = nic.find("source")
        if kind == "network":
            _check_network(networks, "" if src is None else src.get("network", ""), sys_root)
        elif kind == "bridge":
            bridge = "" if src is None else src.get("bridge", "")
            if not bridge:
                raise XMLError("interface of type 'bridge' needs <source bridge=...>")
            if not _bridge_exists(bridge, sys_root):
                # libvirt's text when a tap is to join a bridge that is not there
                raise HostResourceMissing(
                    f"Cannot get interface MTU on '{bridge}': No such device (bridge "
                    f"'{bridge}' of <interface type='bridge'> does not exist on this host)"
                )


def _check_network(networks: Mapping[str, str], name: str, sys_root: Path) -> None:
    if name not in networks:
        raise NoNetwork(f"no network with matching name '{name}'")
    bridge = networks[name]
    if not _bridge_exists(bridge, sys_root):
        # libvirt's text for a network whose bridge is not up
        raise OperationInvalid(
            f"network '{name}' is not active (its bridge '{bridge}' does not exist on this host)"
        )


def _bridge_exists(name: str, sys_root: Path) -> bool:
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise XMLError(f"invalid bridge name '{name}'")
    net = sys_root / "class" / "net" / name
    if not net.exists():
        return False
    if not (net / "bridge").is_dir():
        raise HostResourceMissing(f"network interface '{name}' is not a bridge on this host")
    return True
