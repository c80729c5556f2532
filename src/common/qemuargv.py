"""A domain's QEMU command line, from its XML: what libvirt's qemu_command.c does, as pure
functions (XML and host facts in, argv out), golden-tested as libvirt's qemuxml2argv is.

Two steps. :func:`place_devices` decides what the XML leaves open, the way libvirt does when
a domain starts: a PCI address for every PCI device that has none, a drive address for every
IDE, SATA and SCSI disk that has none (and the controllers those name), a MAC address for
every interface that has none, the virtio-serial controller that channels need, and
<currentMemory> = <memory> when no balloon can hold the guest below it. Its result is the
*live* definition (``dumpxml`` of a running domain); the stored one stays as written, and a
migration sends the live one, so that the destination builds the same device layout.
:func:`build_argv` then maps that XML to arguments, one small function per element.

Nothing is dropped silently: an element this module does not map, and that would change the
guest, is refused with libvirt's ``unsupported configuration`` (:class:`ConfigUnsupported`)
naming it; elements that change nothing the guest sees (``<title>``, ``<metadata>``, ...)
are accepted. docs/GUESTS.md lists what is supported and what each element becomes.

Host facts (:class:`HostFacts`) carry everything that is not in the XML: the binary, the
accelerator, the monitor sockets, where console logs and channel sockets go, the host's
networks (``<interface type='network'>`` names one; the host maps it to a bridge) and the
VNC port picked for an autoport display. Tap devices for bridged interfaces are created by
the daemon (:func:`create_tap`) before QEMU starts; the argv only names them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lxml import etree
from vmmigrate.common.domainxml import DomainDef, _memory_kib
from vmmigrate.common.errors import ConfigUnsupported, OperationFailed, XMLError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

# Named CPU models QEMU 7.2's TCG runs with every feature they define (checked with
# ``-cpu MODEL,enforce``); others need features TCG does not emulate.
TCG_CPU_MODELS = frozenset(
    {
        "486", "Conroe", "Nehalem", "Opteron_G1", "Opteron_G2", "Penryn", "Westmere",
        "athlon", "base", "core2duo", "coreduo", "kvm32", "kvm64", "max", "n270",
        "pentium", "pentium2", "pentium3", "qemu32", "qemu64",
    }
)  # fmt: skip
_MACHINE = re.compile(r"^(pc|q35|pc-i440fx-\d+\.\d+|pc-q35-\d+\.\d+(\.\d+)?)$")
_ARCHES = ("x86_64", "i686")
VNC_BASE_PORT = 5900

# Top-level elements that change nothing the guest sees, or that libvirt's own defaults
# already match (on_poweroff destroy is QEMU's behaviour too; no <panic> device is
# supported, so nothing reports a crash that on_crash would act on). <resource> and
# <seclabel> only in their harmless forms (_check_top_values). <genid> is not one: it is a
# device the guest sees (vmgenid).
_HARMLESS_TOP = frozenset(
    {"name", "uuid", "title", "description", "metadata", "on_poweroff", "on_crash",
     "resource", "seclabel"}
)  # fmt: skip
_MAPPED_TOP = frozenset(
    {"memory", "currentMemory", "vcpu", "os", "features", "cpu", "clock", "devices",
     "on_reboot", "pm"}
)  # fmt: skip
_DEVICES = frozenset(
    {"emulator", "disk", "controller", "interface", "serial", "console", "channel",
     "graphics", "video", "input", "memballoon", "rng", "watchdog"}
)  # fmt: skip
# Children each device may carry; anything else would be dropped, so it is refused.
_COMMON_CHILDREN = frozenset({"address", "alias"})
_DEVICE_CHILDREN: dict[str, frozenset[str]] = {
    "disk": frozenset(
        {"driver", "source", "target", "readonly", "shareable", "serial", "boot",
         "backingStore"}
    ),
    "controller": frozenset({"model", "target", "master", "driver"}),
    "interface": frozenset({"mac", "source", "model", "target", "boot"}),
    "serial": frozenset({"source", "target", "log"}),
    "console": frozenset({"source", "target", "log"}),
    "channel": frozenset({"source", "target"}),
    "graphics": frozenset({"listen"}),
    "video": frozenset({"model"}),
    "input": frozenset(),
    "memballoon": frozenset({"stats"}),
    "rng": frozenset({"backend", "rate"}),
    "watchdog": frozenset(),
    "emulator": frozenset(),
}  # fmt: skip
_OS_CHILDREN = frozenset({"type", "boot", "bootmenu", "kernel", "initrd", "cmdline"})
_CPU_CHILDREN = frozenset({"model", "feature", "topology"})
_FEATURES = frozenset({"acpi", "apic", "pae", "vmport"})

_CACHE = {  # libvirt's cache modes: (cache.direct, cache.no-flush, guest write cache)
    "none": (True, False, True),
    "writethrough": (False, False, False),
    "writeback": (False, False, True),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}
_NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
               "rtl8139": "rtl8139"}  # fmt: skip
_USB_MODELS = {
    "qemu-xhci": "qemu-xhci",
    "nec-xhci": "nec-usb-xhci",
    "piix3-uhci": "piix3-usb-uhci",
    "piix4-uhci": "piix4-usb-uhci",
    "ich9-ehci1": "ich9-usb-ehci1",
    "ich9-uhci1": "ich9-usb-uhci1",
    "ich9-uhci2": "ich9-usb-uhci2",
    "ich9-uhci3": "ich9-usb-uhci3",
}
_PCI_CONTROLLERS = {
    "pcie-root-port": "pcie-root-port",
    "pci-bridge": "pci-bridge",
    "dmi-to-pci-bridge": "i82801b11-bridge",
    "pcie-to-pci-bridge": "pcie-pci-bridge",
}
_VIDEO = {"vga": "VGA", "cirrus": "cirrus-vga", "virtio": "virtio-vga", "bochs": "bochs-display",
          "qxl": "qxl-vga"}  # fmt: skip
_WATCHDOG_ACTIONS = frozenset({"reset", "shutdown", "poweroff", "pause", "none", "inject-nmi"})
_BOOT_DEVS = {"hd": "c", "cdrom": "d", "network": "n", "fd": "a"}


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What the host adds to a domain's XML to run it."""

    binary: str = "qemu-system-x86_64"
    accel: str = "tcg"  # tcg | kvm
    monitors: tuple[str, ...] = ()  # QMP unix sockets
    # Per domain: serial/console logs (port 0 here, port N at "<path>.N"), and where the
    # sockets of channels that name no path go ("<prefix>N" for channel N: a unix socket
    # path holds 107 bytes, so no longer name).
    console_log: str = ""
    channel_prefix: str = "/run/vmmigrate/channel"
    networks: Mapping[str, str] = dataclasses.field(default_factory=dict)  # NAME -> bridge
    vnc_port: int | None = None  # the port picked for an autoport VNC display
    tcg_cpu_models: frozenset[str] = TCG_CPU_MODELS


def unsupported(what: str) -> ConfigUnsupported:
    return ConfigUnsupported(what)


def _int(text: str | None, what: str, default: int = 0) -> int:
    if text is None:
        return default
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise XMLError(f"invalid value '{text}' for {what}") from None


def _esc(value: str) -> str:
    """QEMU's option syntax: a comma inside a value is written twice."""
    return value.replace(",", ",,")


def _opts(head: str, **props: str | int | None) -> str:
    parts = [head]
    for key, value in props.items():
        if value is not None:
            parts.append(f"{key}={_esc(str(value))}")
    return ",".join(parts)


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _root(domain: DomainDef | etree._Element) -> etree._Element:
    if isinstance(domain, DomainDef):
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        # parse_domain's hardened parser accepted this text already
        return etree.fromstring(domain.xml.encode(), parser)
    return copy.deepcopy(domain)


def _local(el: etree._Element) -> str:
    return el.tag if isinstance(el.tag, str) else ""


def _children(el: etree._Element) -> Iterator[etree._Element]:
    for child in el:
        if isinstance(child.tag, str):
            yield child


# ------------------------------------------------------------------------ machine facts


@dataclasses.dataclass(frozen=True)
class _Machine:
    name: str  # as written: pc, q35, pc-i440fx-7.2, ...

    @property
    def q35(self) -> bool:
        return "q35" in self.name

    @property
    def root_bus(self) -> str:
        return "pcie.0" if self.q35 else "pci.0"


def _machine(root: etree._Element) -> _Machine:
    type_el = root.find("os/type")
    if type_el is not None and (type_el.text or "hvm").strip() != "hvm":
        raise unsupported(f"os type '{(type_el.text or '').strip()}' is not supported")
    arch = "x86_64" if type_el is None else type_el.get("arch", "x86_64")
    if arch not in _ARCHES:
        raise unsupported(f"domain architecture '{arch}' is not supported by this host")
    name = "pc" if type_el is None else type_el.get("machine", "pc")
    if not _MACHINE.match(name):
        raise unsupported(f"machine type '{name}' is not supported by this host")
    return _Machine(name)


# ------------------------------------------------------------------------ checks


def check_supported(domain: DomainDef | etree._Element, accel: str | None = None) -> None:
    """Refuse, naming it, the first element or attribute this module would not map.

    ``accel`` (tcg, kvm): the host's accelerator. Given, the argv is built too, with
    stand-in host facts (any network name maps, an autoport display has its port), so that
    every refusal of the argv's own happens here as well; the host's networks are asked at
    start and Prepare. None: what depends on the accelerator waits for the argv."""
    root = _root(domain)
    _check_elements(root, accel)
    live = place_devices(root)  # refuses addresses that cannot be honoured (drive addresses, ...)
    if accel is not None:
        _argv(live, HostFacts(accel=accel, networks=_AnyNetwork(), vnc_port=VNC_BASE_PORT))


class _AnyNetwork(Mapping[str, str]):
    """The networks of a host that is not asked: every name maps to a bridge."""

    def __getitem__(self, key: str) -> str:
        return "br0"

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _check_elements(root: etree._Element, accel: str | None) -> None:
    for el in _children(root):
        tag = _local(el)
        if el.tag == f"{{{QEMU_NS}}}commandline":
            continue  # the emulator policy decides (hypervisor.check_definition)
        if tag not in _HARMLESS_TOP and tag not in _MAPPED_TOP:
            raise unsupported(f"domain element <{tag or el.tag}> is not supported")
    _check_children(root.find("os"), _OS_CHILDREN, "os")
    _check_children(root.find("features"), _FEATURES, "features")
    _check_children(root.find("cpu"), _CPU_CHILDREN, "cpu")
    on_poweroff = (root.findtext("on_poweroff") or "destroy").strip()
    if on_poweroff != "destroy":
        raise unsupported(f"on_poweroff '{on_poweroff}' is not supported")
    _check_top_values(root)
    _check_cpu(root.find("cpu"))
    _clock_plan(root, accel)
    if root.find("maxMemory") is not None:
        raise unsupported("domain element <maxMemory> is not supported")
    devices = root.find("devices")
    for dev in [] if devices is None else _children(devices):
        tag = _local(dev)
        if tag not in _DEVICES:
            raise unsupported(f"device <{tag}> is not supported")
        _check_children(dev, _DEVICE_CHILDREN[tag] | _COMMON_CHILDREN, tag)
        check = _DEVICE_CHECKS.get(tag)
        if check is not None:
            check(dev)
    _machine(root)


def _check_children(el: etree._Element | None, allowed: frozenset[str], where: str) -> None:
    if el is None:
        return
    for child in _children(el):
        if _local(child) not in allowed:
            raise unsupported(f"element <{_local(child)}> of <{where}> is not supported")


def _check_attrs(el: etree._Element | None, allowed: frozenset[str], what: str) -> None:
    """Refuse, naming it, an attribute of ``el`` that nothing reads (``what``: how the
    text names the element: "VNC", "disk target", ...)."""
    if el is None:
        return
    extra = sorted(str(k) for k in el.attrib if k not in allowed)
    if extra:
        raise unsupported(f"{what} attribute '{extra[0]}' is not supported")


def _on_off(value: str, what: str) -> str:
    if value not in ("on", "off"):
        raise XMLError(f"invalid value '{value}' for {what} (on or off)")
    return value


def _yes_no(value: str | None, what: str) -> None:
    if value not in (None, "yes", "no"):
        raise XMLError(f"invalid value '{value}' for {what} (yes or no)")


# ------------------------------------------------------------------------ top-level values

# libvirt's crash actions. None acts here: no <panic> device is supported, so QEMU never
# reports a guest crash (libvirt's on_crash waits for the same report); the value is only
# checked.
_ON_CRASH = frozenset(
    {"destroy", "restart", "preserve", "coredump-destroy", "coredump-restart", "rename-restart"}
)
# libvirt's default cgroup partition, which libvirt writes into every domain it runs
_DEFAULT_PARTITION = "/machine"
_VCPU_ATTRS = frozenset({"current", "placement", "cpuset"})
_MAX_HOST_CPU = 4095


def _check_top_values(root: etree._Element) -> None:
    """<on_crash>, <resource>, <seclabel> and <vcpu>'s attributes: accepted only where
    nothing is left undone (docs/GUESTS.md, "Top-level elements")."""
    on_crash = (root.findtext("on_crash") or "destroy").strip()
    if on_crash not in _ON_CRASH:
        raise XMLError(f"invalid on_crash action '{on_crash}'")
    resource = root.find("resource")
    if resource is not None:
        _check_children(resource, frozenset({"partition"}), "resource")
        partition = (resource.findtext("partition") or _DEFAULT_PARTITION).strip()
        if partition != _DEFAULT_PARTITION:
            raise unsupported(
                f"resource partition '{partition}' is not supported (emulators are placed in "
                "no cgroup of their own; only libvirt's default '/machine' is accepted)"
            )
    for label in root.iterfind("seclabel"):
        kind = label.get("type", "dynamic")
        if kind != "none":
            raise unsupported(
                f"seclabel type '{kind}' is not supported (no security driver labels the "
                "emulator: it runs as the host's emulator_user)"
            )
        _check_attrs(label, frozenset({"type", "model"}), "seclabel")
        _check_children(label, frozenset(), "seclabel")
    vcpu = root.find("vcpu")
    _check_attrs(vcpu, _VCPU_ATTRS, "vcpu")
    placement = "static" if vcpu is None else vcpu.get("placement", "static")
    if placement != "static":
        raise unsupported(f"vcpu placement '{placement}' is not supported (no numad)")
    host_cpus(root)


def host_cpus(domain: DomainDef | etree._Element) -> frozenset[int] | None:
    """The host CPUs ``<vcpu cpuset>`` confines the emulator to (libvirt pins the whole QEMU
    process to them when no <cputune> says otherwise); None: no pinning."""
    vcpu = _root(domain).find("vcpu")
    text = None if vcpu is None else vcpu.get("cpuset")
    return None if text is None else parse_cpuset(text)


def parse_cpuset(text: str) -> frozenset[int]:
    """libvirt's CPU list syntax: numbers and ranges, "^N" takes one out ("0-3,^2,6")."""
    chosen: set[int] = set()
    dropped: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\^)?(\d+)(?:-(\d+))?\s*", part)
        if m is None or (m.group(1) and m.group(3)):
            raise XMLError(f"Failed to parse bitmap '{text}'")
        lo = int(m.group(2))
        hi = int(m.group(3) or lo)
        if hi < lo or hi > _MAX_HOST_CPU:
            raise XMLError(f"Failed to parse bitmap '{text}'")
        (dropped if m.group(1) else chosen).update(range(lo, hi + 1))
    cpus = frozenset(chosen - dropped)
    if not cpus:
        raise XMLError(f"Invalid value of 'cpuset': {text}")
    return cpus


# ------------------------------------------------------------------------ placement


def _pci_slot_owner(dev: etree._Element, machine: _Machine) -> bool:
    """Whether a device sits on a PCI bus (and so needs an address)."""
    tag = _local(dev)
    if tag == "disk":
        return _target_bus(dev) == "virtio"
    if tag == "interface":
        return True
    if tag == "controller":
        return _controller_is_pci(dev, machine)
    if tag == "video":
        return _video_model(dev) != "none"
    if tag in ("memballoon", "rng"):
        return dev.get("model", "virtio") == "virtio"
    if tag == "watchdog":
        return dev.get("model") == "i6300esb"
    if tag == "input":
        return dev.get("bus") == "virtio"
    return False


def _controller_is_pci(dev: etree._Element, machine: _Machine) -> bool:
    kind, model = dev.get("type"), dev.get("model", "")
    if kind == "pci":
        return model not in ("pci-root", "pcie-root")
    if kind == "usb":
        return model != "none"
    if kind == "sata":  # q35's AHCI is built in
        return not machine.q35
    return kind in ("scsi", "virtio-serial")


def _target_bus(disk: etree._Element) -> str:
    target = disk.find("target")
    return "ide" if target is None else target.get("bus", "ide")


def _video_model(dev: etree._Element) -> str:
    model = dev.find("model")
    return "vga" if model is None else model.get("type", "vga")


def _pci_address(dev: etree._Element) -> tuple[int, int, int] | None:
    addr = dev.find("address")
    if addr is None or addr.get("type") != "pci":
        return None
    return (
        _int(addr.get("bus"), "PCI bus"),
        _int(addr.get("slot"), "PCI slot"),
        _int(addr.get("function"), "PCI function"),
    )


def _set_pci_address(dev: etree._Element, slot: int, function: int = 0) -> None:
    addr = etree.SubElement(dev, "address")
    addr.set("type", "pci")
    addr.set("domain", "0x0000")
    addr.set("bus", "0x00")
    addr.set("slot", f"0x{slot:02x}")
    addr.set("function", f"0x{function:x}")


class _SlotPool:
    """Free slots of the root bus, in order; slot 0 is the host bridge, slot 1 the PIIX3 on
    pc, slot 0x1f the ICH9 functions on q35, slot 2 is kept for the primary video card."""

    def __init__(self, machine: _Machine, used: set[int]) -> None:
        reserved = {0, 2, 0x1F} if machine.q35 else {0, 1, 2}
        self.free = [s for s in range(0x20) if s not in reserved and s not in used]
        self.video_free = 2 not in used

    def take(self) -> int:
        if not self.free:
            raise unsupported("no free PCI slot left on the root bus")
        return self.free.pop(0)


def place_devices(domain: DomainDef | etree._Element, uuid: str = "") -> etree._Element:
    """The live definition: ``domain`` with what QEMU needs decided (see the module
    docstring). Deterministic, and an identity on its own output."""
    root = _root(domain)
    machine = _machine(root)
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    _live_current_memory(root)
    _add_virtio_serial(devices)
    _assign_drive_addresses(devices)
    _add_disk_controllers(devices)
    _assign_macs(devices, uuid or root.findtext("uuid") or "")
    owners = [d for d in _children(devices) if _pci_slot_owner(d, machine)]
    used = {a[1] for d in owners if (a := _pci_address(d)) is not None and a[0] == 0}
    pool = _SlotPool(machine, used)
    _place_usb_companions(devices, machine, pool)
    for dev in owners:
        if dev.find("address") is not None:
            continue
        if _local(dev) == "video" and pool.video_free:
            pool.video_free = False
            _set_pci_address(dev, 2)
        else:
            _set_pci_address(dev, pool.take())
    return root


def _place_usb_companions(devices: etree._Element, machine: _Machine, pool: _SlotPool) -> None:
    """USB controllers of one index share a slot (EHCI at function 7, its UHCI companions
    at 0-2), as libvirt lays them out; pc's PIIX3 UHCI is function 2 of the PIIX3 slot."""
    by_index: dict[str, list[etree._Element]] = {}
    for dev in devices.iterfind("controller[@type='usb']"):
        if dev.get("model", "") != "none" and dev.find("address") is None:
            by_index.setdefault(dev.get("index", "0"), []).append(dev)
    for group in by_index.values():
        if len(group) == 1 and group[0].get("model") == "piix3-uhci" and not machine.q35:
            _set_pci_address(group[0], 1, 2)
            continue
        if len(group) == 1:
            continue  # an ordinary PCI device: place_devices gives it a slot
        slot = pool.take()
        for dev in group:
            model = dev.get("model", "")
            function = 7 if model.startswith("ich9-ehci") else int(model[-1:] or "1") - 1
            _set_pci_address(dev, slot, function)
            if function == 0:
                dev[-1].set("multifunction", "on")


def _add_virtio_serial(devices: etree._Element) -> None:
    """libvirt adds the virtio-serial controller that virtio channels and consoles need."""
    needs = devices.find("channel") is not None or any(
        (t := c.find("target")) is not None and t.get("type") == "virtio"
        for c in devices.iterfind("console")
    )
    if needs and devices.find("controller[@type='virtio-serial']") is None:
        ctl = etree.SubElement(devices, "controller")
        ctl.set("type", "virtio-serial")
        ctl.set("index", "0")


# ------------------------------------------------------------------------ drive addresses

# Disks on these buses sit on a controller, at an <address type='drive'> (controller, bus,
# target, unit). Without one, a disk gets libvirt's default from its index (the N of sdN /
# hdN: virDomainDiskDefAssignAddress): IDE 2 buses x 2 units per controller, SATA 6 units
# (the AHCI ports) on bus 0, SCSI 7 units on bus 0 (QEMU's narrow SCSI bus).
_DRIVE_BUSES = ("ide", "sata", "scsi")
_DRIVE_FIELDS = ("controller", "bus", "target", "unit")
DriveAddress = tuple[int, int, int, int]
_VIRTIO_SCSI_MAX_TARGET, _VIRTIO_SCSI_MAX_LUN = 255, 16383  # QEMU's virtio-scsi limits


def default_drive_address(bus: str, index: int) -> DriveAddress:
    """libvirt's drive address of the disk with ``index`` on ``bus`` (ide, sata, scsi)."""
    if bus == "ide":
        return (index // 4, (index % 4) // 2, 0, index % 2)
    if bus == "sata":
        return (index // 6, 0, 0, index % 6)
    return (index // 7, 0, 0, index % 7)


def _drive_address(disk: etree._Element) -> DriveAddress | None:
    addr = disk.find("address")
    if addr is None or addr.get("type") != "drive":
        return None
    values = tuple(_int(addr.get(k), f"drive address {k}") for k in _DRIVE_FIELDS)
    if min(values) < 0:
        raise XMLError(f"invalid drive address of disk '{_target_dev(disk)}': negative value")
    return values  # type: ignore[return-value]


def _target_dev(disk: etree._Element) -> str:
    target = disk.find("target")
    return "" if target is None else target.get("dev", "")


def _check_drive_address(bus: str, addr: DriveAddress) -> None:
    """What the bus's controller can hold (libvirt's texts where it has them)."""
    controller, dbus, target, unit = addr
    if bus == "ide":
        if controller != 0:
            raise unsupported("Only 1 IDE controller is supported")
        if target != 0:
            raise unsupported("target must be 0 for ide controller")
        if dbus > 1 or unit > 1:
            raise unsupported(
                f"IDE drive address bus='{dbus}' unit='{unit}' does not exist "
                "(the IDE controller has buses 0-1, units 0-1)"
            )
    elif bus == "sata":
        if dbus != 0:
            raise unsupported("bus must be 0 for sata controller")
        if target != 0:
            raise unsupported("target must be 0 for sata controller")
        if unit > 5:
            raise unsupported(
                f"SATA drive address unit='{unit}' does not exist (an AHCI controller has "
                "units 0-5)"
            )
    else:
        if dbus != 0:
            raise unsupported("SCSI controller only supports 1 bus")
        if target > _VIRTIO_SCSI_MAX_TARGET or unit > _VIRTIO_SCSI_MAX_LUN:
            raise unsupported(
                f"SCSI drive address target='{target}' unit='{unit}' is out of range "
                f"(virtio-scsi: targets 0-{_VIRTIO_SCSI_MAX_TARGET}, "
                f"units 0-{_VIRTIO_SCSI_MAX_LUN})"
            )


def _set_drive_address(disk: etree._Element, addr: DriveAddress) -> None:
    el = etree.SubElement(disk, "address")
    el.set("type", "drive")
    for key, value in zip(_DRIVE_FIELDS, addr, strict=True):
        el.set(key, str(value))


def _assign_drive_addresses(devices: etree._Element) -> None:
    """A drive address for each IDE, SATA and SCSI disk that has none (written ones are
    kept), each checked against its controller; two disks of one bus at one address are
    refused, as libvirt refuses them."""
    seen: dict[tuple[str, DriveAddress], str] = {}
    for disk in devices.iterfind("disk"):
        bus = _target_bus(disk)
        el = disk.find("address")
        if bus == "virtio" and el is not None and el.get("type", "pci") != "pci":
            raise unsupported("unexpected address type for virtio disk")
        if bus not in _DRIVE_BUSES:
            continue
        if el is None:
            _set_drive_address(disk, default_drive_address(bus, _disk_index(disk)))
        elif el.get("type") != "drive":
            raise unsupported(f"unexpected address type for {bus} disk")
        addr = _drive_address(disk)
        assert addr is not None  # set or checked above
        _check_drive_address(bus, addr)
        if (bus, addr) in seen:
            c, b, t, u = addr
            raise unsupported(
                f"Found duplicate drive address for disk with target name "
                f"'{seen[(bus, addr)]}' controller='{c}' bus='{b}' target='{t}' unit='{u}'"
            )
        seen[(bus, addr)] = _target_dev(disk)


def _add_disk_controllers(devices: etree._Element) -> None:
    """The SATA and SCSI controllers the disks' addresses name and the definition lacks,
    as libvirt adds them (index 0 up to the highest one named); an added SCSI controller
    is a virtio-scsi one, written so. IDE's is the PIIX3's own (index 0 only)."""
    highest: dict[str, int] = {}
    for disk in devices.iterfind("disk"):
        bus, addr = _target_bus(disk), _drive_address(disk)
        if bus in ("sata", "scsi") and addr is not None:
            highest[bus] = max(highest.get(bus, 0), addr[0])
    for kind in sorted(highest):
        have = {
            _int(c.get("index"), "controller index")
            for c in devices.iterfind(f"controller[@type='{kind}']")
        }
        for index in range(highest[kind] + 1):
            if index in have:
                continue
            ctl = etree.SubElement(devices, "controller")
            ctl.set("type", kind)
            ctl.set("index", str(index))
            if kind == "scsi":
                ctl.set("model", "virtio-scsi")


def _assign_macs(devices: etree._Element, uuid: str) -> None:
    """A MAC for each interface that has none, in QEMU's 52:54:00 range, derived from the
    domain's UUID so that the same definition gets the same MACs on every start."""
    for i, nic in enumerate(devices.iterfind("interface")):
        if nic.find("mac") is not None:
            continue
        tail = hashlib.sha256(f"{uuid}/{i}".encode()).digest()[:3]
        mac = etree.Element("mac")
        mac.set("address", "52:54:00:" + ":".join(f"{b:02x}" for b in tail))
        nic.insert(0, mac)


# ------------------------------------------------------------------------ memory


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """<memory> and <currentMemory> (KiB), and whether a virtio balloon can carry the
    difference. QEMU gets ``-m`` = <memory>; libvirt then sets the balloon's target to
    <currentMemory> (QMP ``balloon``) before the guest runs."""

    memory_kib: int
    current_kib: int
    balloon: bool

    @property
    def balloon_target_kib(self) -> int | None:
        """The target to set after a (not incoming) start; None: nothing to set."""
        return self.current_kib if self.balloon and self.current_kib < self.memory_kib else None

    @property
    def current_ignored(self) -> bool:
        """<currentMemory> below <memory> with no balloon: libvirt runs the guest with all
        of <memory> (its live definition says so); the caller warns, naming it."""
        return not self.balloon and self.current_kib < self.memory_kib


def memory_plan(domain: DomainDef | etree._Element) -> MemoryPlan:
    root = _root(domain)
    memory = _memory_kib(root.find("memory"))
    current = _memory_kib(root.find("currentMemory")) or memory
    balloon = root.find("devices/memballoon")
    has = balloon is not None and balloon.get("model", "virtio") == "virtio"
    return MemoryPlan(memory, min(current, memory), has)


def _live_current_memory(root: etree._Element) -> None:
    """The running definition's <currentMemory>: <memory> when no balloon can hold it
    lower (libvirt's live value then)."""
    plan = memory_plan(root)
    current = root.find("currentMemory")
    if current is not None and plan.current_ignored:
        current.text = str(plan.memory_kib)
        current.set("unit", "KiB")


def live_xml(domain: DomainDef) -> str:
    """The running definition's text: the stored one with the device placement added."""
    return etree.tostring(place_devices(domain, domain.uuid), encoding="unicode")


# ------------------------------------------------------------------------ the argv


@dataclasses.dataclass
class _Ctx:
    """Per-build state: counters that make ids and node names."""

    root: etree._Element
    facts: HostFacts
    machine: _Machine
    disk_nodes: int = 0
    usb_ports: int = 0

    def pci(self, dev: etree._Element) -> dict[str, str | int | None]:
        """bus= and addr= of a placed PCI device."""
        addr = _pci_address(dev)
        if addr is None:
            return {}
        bus, slot, function = addr
        name = self.machine.root_bus if bus == 0 else f"pci.{bus}"
        if bus and self.root.find(f"devices/controller[@type='pci'][@index='{bus}']") is None:
            raise XMLError(f"no PCI controller with index {bus} for PCI address bus {bus:#x}")
        address = f"0x{slot:x}" if function == 0 else f"0x{slot:x}.0x{function:x}"
        el = dev.find("address")
        multi = "on" if el is not None and el.get("multifunction") == "on" else None
        return {"bus": name, "addr": address, "multifunction": multi}

    def usb_port(self) -> int:
        if self.root.find("devices/controller[@type='usb']") is None:
            raise unsupported("a USB device needs a <controller type='usb'>")
        self.usb_ports += 1
        return self.usb_ports


def build_argv(domain: DomainDef | etree._Element, facts: HostFacts) -> list[str]:
    """QEMU's argv (without -S/-incoming, which the caller adds) for ``domain``."""
    root = _root(domain)
    _check_elements(root, facts.accel)
    return _argv(place_devices(root), facts)


def _argv(root: etree._Element, facts: HostFacts) -> list[str]:
    """The argv of a checked and placed definition."""
    ctx = _Ctx(root, facts, _machine(root))
    argv = [facts.binary]
    for part in _PARTS:
        argv += part(ctx)
    return argv


def _name_uuid(ctx: _Ctx) -> list[str]:
    name = ctx.root.findtext("name") or ""
    return ["-name", f"guest={_esc(name)}", "-uuid", (ctx.root.findtext("uuid") or "").strip()]


def _machine_args(ctx: _Ctx) -> list[str]:
    feats = ctx.root.find("features")
    acpi = "on" if feats is not None and feats.find("acpi") is not None else "off"
    props: dict[str, str | int | None] = {"accel": ctx.facts.accel, "acpi": acpi}
    vmport = None if feats is None else feats.find("vmport")
    if vmport is not None:
        props["vmport"] = vmport.get("state", "on")
    hpet = ctx.root.find("clock/timer[@name='hpet']")
    if hpet is not None:
        props["hpet"] = "off" if hpet.get("present") == "no" else "on"
    return ["-machine", _opts(ctx.machine.name, **props)]


def cpu_model(
    cpu: etree._Element, accel: str, tcg_cpu_models: frozenset[str] = TCG_CPU_MODELS
) -> str | None:
    """The QEMU CPU model ``-cpu`` names for ``<cpu>`` (None: topology only, QEMU's
    default model); what this host's accelerator cannot run is refused."""
    mode = cpu.get("mode", "custom")
    model_el = cpu.find("model")
    model = (model_el.text or "").strip() if model_el is not None else ""
    if mode in ("host-passthrough", "maximum", "host-model"):
        return "max" if accel == "tcg" or mode == "maximum" else "host"
    if mode == "custom" and model:
        if accel == "tcg" and model not in tcg_cpu_models:
            raise unsupported(
                f"CPU model '{model}' is not supported by TCG (runs: "
                f"{', '.join(sorted(tcg_cpu_models))}); use host-model or "
                "host-passthrough"
            )
        return model
    if mode == "custom":
        return None  # topology only
    raise unsupported(f"CPU mode '{mode}' is not supported")


def _cpu_args(ctx: _Ctx) -> list[str]:
    cpu = ctx.root.find("cpu")
    accel = ctx.facts.accel
    name = None if cpu is None else cpu_model(cpu, accel, ctx.facts.tcg_cpu_models)
    flags = "" if cpu is None or name is None else _cpu_features(cpu) + _cpu_flags(cpu, accel)
    timers = _clock_plan(ctx.root, accel).cpu
    if name is None and not timers:
        return []
    if name is None:  # QEMU's default model, named so that the timers' flags can follow
        name = "qemu32" if _arch(ctx.root) == "i686" else "qemu64"
    return ["-cpu", name + flags + timers]


_CPU_ATTRS = frozenset({"mode", "match", "check", "migratable"})
_CPU_CHECKS = frozenset({"none", "partial", "full"})
_TOPOLOGY = ("sockets", "dies", "cores", "threads")


def _check_cpu(cpu: etree._Element | None) -> None:
    """<cpu>'s attributes and those of its children (docs/GUESTS.md, "<cpu>")."""
    if cpu is None:
        return
    _check_attrs(cpu, _CPU_ATTRS, "CPU")
    match = cpu.get("match", "exact")
    if match == "minimum":
        raise unsupported(
            "CPU match 'minimum' is not supported (the guest gets the model as written, "
            "never a better one)"
        )
    if match not in ("exact", "strict"):
        raise XMLError("Invalid match attribute for CPU specification")
    if cpu.get("check", "partial") not in _CPU_CHECKS:
        raise XMLError("Invalid check attribute for CPU specification")
    migratable = cpu.get("migratable")
    if migratable is not None:
        if cpu.get("mode", "custom") not in ("host-passthrough", "maximum"):
            raise unsupported(
                "Attribute migratable is only allowed for 'host-passthrough' / 'maximum' CPU mode"
            )
        if migratable not in ("on", "off"):
            raise XMLError(f"Invalid value in migratable attribute: '{migratable}'")
    model = cpu.find("model")
    _check_attrs(model, frozenset({"fallback"}), "CPU model")
    if model is not None and model.get("fallback", "allow") not in ("allow", "forbid"):
        raise XMLError("Invalid fallback attribute")
    _check_attrs(cpu.find("topology"), frozenset(_TOPOLOGY), "CPU topology")
    for feature in cpu.iterfind("feature"):
        _check_attrs(feature, frozenset({"policy", "name"}), "CPU feature")


def _cpu_check(cpu: etree._Element) -> str:
    """<cpu check>, with libvirt's default: none for host-passthrough and maximum,
    partial for the others."""
    default = "none" if cpu.get("mode") in ("host-passthrough", "maximum") else "partial"
    return cpu.get("check", default)


def _cpu_flags(cpu: etree._Element, accel: str) -> str:
    """check partial or full: QEMU's enforce, which refuses to start rather than give the
    guest less than the model and its <feature>s ask (libvirt checks that before the
    start). full also means nothing more than asked: true of TCG, which adds no feature of
    its own to a model, not of KVM (its paravirtual features), so refused there.
    migratable='off': the host CPU's non-migratable features too."""
    check = _cpu_check(cpu)
    if check == "full" and accel == "kvm":
        raise unsupported(
            "CPU check 'full' is not supported under KVM (QEMU's enforce finds features "
            "missing, not those KVM adds); use check='partial'"
        )
    out = ",migratable=off" if cpu.get("migratable") == "off" else ""
    return out + (",enforce" if check != "none" else "")


def _arch(root: etree._Element) -> str:
    type_el = root.find("os/type")
    return "x86_64" if type_el is None else type_el.get("arch", "x86_64")


def _cpu_features(cpu: etree._Element) -> str:
    out = ""
    for feat in cpu.iterfind("feature"):
        policy, name = feat.get("policy", "require"), feat.get("name", "")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise XMLError(f"invalid CPU feature name '{name}'")
        if policy in ("require", "force"):
            out += f",{name}=on"
        elif policy in ("disable", "forbid"):
            out += f",{name}=off"
        elif policy != "optional":
            raise unsupported(f"CPU feature policy '{policy}' is not supported")
    return out


def _memory_args(ctx: _Ctx) -> list[str]:
    mem = ctx.root.find("memory")
    if mem is None:
        raise XMLError("missing memory element")
    kib = _memory_kib(mem)
    if kib < 1024:
        raise XMLError("memory size must be at least 1 MiB")
    return ["-m", f"size={kib}k"]


def _smp_args(ctx: _Ctx) -> list[str]:
    vcpu = ctx.root.find("vcpu")
    total = _int(None if vcpu is None else vcpu.text, "<vcpu>", 1)
    current = _int(None if vcpu is None else vcpu.get("current"), "<vcpu current>", total)
    if not 1 <= current <= total:
        raise XMLError("Invalid number of vCPUs")
    topo = ctx.root.find("cpu/topology")
    shape: dict[str, int] = {"sockets": total, "cores": 1, "threads": 1}
    if topo is not None:
        shape = {k: _int(topo.get(k), k, 1) for k in _TOPOLOGY if k != "dies" or k in topo.attrib}
        if shape["sockets"] * shape.get("dies", 1) * shape["cores"] * shape["threads"] != total:
            raise XMLError("CPU topology doesn't match maximum vcpu count")
    spec = _opts(str(current), maxcpus=total, **shape)
    return ["-smp", spec]


def _base_args(ctx: _Ctx) -> list[str]:
    out = ["-no-user-config", "-nodefaults"]
    if ctx.root.find("devices/graphics") is None:
        out += ["-display", "none"]
    for path in ctx.facts.monitors:
        out += ["-qmp", f"unix:{_esc(path)},server=on,wait=off"]
    return out


def _clock_args(ctx: _Ctx) -> list[str]:
    plan = _clock_plan(ctx.root, ctx.facts.accel)
    out = [] if plan.rtc is None else ["-rtc", _opts("", **plan.rtc).lstrip(",")]
    for value in plan.globals:
        out += ["-global", value]
    return out


@dataclasses.dataclass
class _ClockPlan:
    """What <clock> becomes: -rtc's options (None: no <clock>), -global values, and flags
    for -cpu (kvmclock and the TSC's frequency are CPU properties in QEMU)."""

    rtc: dict[str, str | int | None] | None = None
    globals: list[str] = dataclasses.field(default_factory=list)
    cpu: str = ""


_RTC_TRACK = {"guest": "vm", "wall": "host", "realtime": "rt"}
_TICKPOLICIES = ("delay", "catchup", "merge", "discard")  # libvirt's
_TIMER_ATTRS = {
    "rtc": frozenset({"name", "tickpolicy", "track"}),
    "pit": frozenset({"name", "tickpolicy"}),
    "hpet": frozenset({"name", "present"}),
    "kvmclock": frozenset({"name", "present"}),
    "tsc": frozenset({"name", "frequency"}),
}


def _clock_plan(root: etree._Element, accel: str | None) -> _ClockPlan:
    """<clock> checked and mapped, timer by timer. ``accel`` None: what depends on the
    accelerator is neither checked nor mapped."""
    plan = _ClockPlan()
    clock = root.find("clock")
    if clock is None:
        return plan
    offset = clock.get("offset", "utc")
    if offset not in ("utc", "localtime"):
        raise unsupported(f"clock offset '{offset}' is not supported")
    _check_attrs(clock, frozenset({"offset"}), "clock")
    _check_children(clock, frozenset({"timer"}), "clock")
    plan.rtc = {"base": offset}
    for timer in clock.iterfind("timer"):
        name = timer.get("name", "")
        if name not in _TIMER_ATTRS:
            raise unsupported(f"clock timer '{name}' is not supported")
        _check_attrs(timer, _TIMER_ATTRS[name], f"clock timer '{name}'")
        _check_children(timer, frozenset(), "timer")
        _TIMERS[name](timer, accel, plan)
    return plan


def _tickpolicy(timer: etree._Element, what: str, honoured: tuple[str, ...]) -> str:
    """The timer's tickpolicy (delay when absent), one of ``honoured``: another of libvirt's
    four is refused (unsupported for ``what``), any other word is an XML error."""
    policy = timer.get("tickpolicy", "delay")
    if policy not in honoured:
        if policy in _TICKPOLICIES:
            raise unsupported(f"unsupported {what} tickpolicy '{policy}'")
        raise XMLError(f"unknown timer tickpolicy '{policy}'")
    return policy


def _rtc_timer(timer: etree._Element, accel: str | None, plan: _ClockPlan) -> None:
    assert plan.rtc is not None  # set before the timers
    track = timer.get("track")
    if track == "boot":
        raise unsupported("unsupported rtc timer track 'boot'")
    if track is not None:
        if track not in _RTC_TRACK:
            raise XMLError(f"unknown timer track '{track}'")
        plan.rtc["clock"] = _RTC_TRACK[track]
    if _tickpolicy(timer, "rtc timer", ("delay", "catchup")) == "catchup":
        plan.rtc["driftfix"] = "slew"


def _pit_timer(timer: etree._Element, accel: str | None, plan: _ClockPlan) -> None:
    """KVM's in-kernel PIT takes delay or discard (lost_tick_policy). Under TCG the PIT is
    QEMU's own i8254, which has no lost-tick policy to set: delay (virt-install's) is
    accepted, as libvirt accepts it there; discard is refused."""
    policy = _tickpolicy(timer, "pit", ("delay", "discard"))
    if accel == "kvm":
        plan.globals.append(f"kvm-pit.lost_tick_policy={policy}")
    elif accel is not None and policy == "discard":
        raise unsupported(
            "pit tickpolicy 'discard' needs KVM's in-kernel PIT (qemu_accel kvm): "
            "TCG's PIT has no lost-tick policy"
        )


def _hpet_timer(timer: etree._Element, accel: str | None, plan: _ClockPlan) -> None:
    _yes_no(timer.get("present"), "hpet timer present")  # -machine hpet=: _machine_args


def _kvmclock_timer(timer: etree._Element, accel: str | None, plan: _ClockPlan) -> None:
    """A CPU property under KVM. QEMU never gives a TCG guest kvmclock, so present='no'
    holds there by itself and present='yes' cannot."""
    present = timer.get("present")
    _yes_no(present, "kvmclock timer present")
    if present is None:
        return
    if accel == "kvm":
        plan.cpu += f",kvmclock={'on' if present == 'yes' else 'off'}"
    elif accel is not None and present == "yes":
        raise unsupported("clock timer 'kvmclock' needs KVM (qemu_accel kvm): TCG has none")


def _tsc_timer(timer: etree._Element, accel: str | None, plan: _ClockPlan) -> None:
    freq = timer.get("frequency")
    if freq is None:
        return
    hz = _int(freq, "tsc timer frequency")
    if hz <= 0:
        raise XMLError(f"invalid value '{freq}' for tsc timer frequency")
    if accel == "kvm":
        plan.cpu += f",tsc-frequency={hz}"
    elif accel is not None:
        raise unsupported(
            "tsc timer frequency needs KVM (qemu_accel kvm): TCG does not scale its TSC"
        )


_TIMERS: dict[str, Callable[[etree._Element, str | None, _ClockPlan], None]] = {
    "rtc": _rtc_timer,
    "pit": _pit_timer,
    "hpet": _hpet_timer,
    "kvmclock": _kvmclock_timer,
    "tsc": _tsc_timer,
}


def _boot_args(ctx: _Ctx) -> list[str]:
    os_el = ctx.root.find("os")
    boots = [] if os_el is None else [b.get("dev", "") for b in os_el.iterfind("boot")]
    per_device = ctx.root.find("devices/*/boot") is not None
    if boots and per_device:
        raise XMLError("per-device boot elements cannot be used together with os/boot elements")
    props: dict[str, str | int | None] = {}
    if boots:
        bad = [b for b in boots if b not in _BOOT_DEVS]
        if bad:
            raise unsupported(f"boot device '{bad[0]}' is not supported")
        props["order"] = "".join(_BOOT_DEVS[b] for b in boots)
    menu = None if os_el is None else os_el.find("bootmenu")
    if menu is not None:
        props["menu"] = "on" if menu.get("enable") == "yes" else "off"
    if per_device:
        props["strict"] = "on"
    return ["-boot", _opts("", **props).lstrip(",")] if props else []


def _kernel_args(ctx: _Ctx) -> list[str]:
    out = []
    for tag, opt in (("kernel", "-kernel"), ("initrd", "-initrd"), ("cmdline", "-append")):
        text = ctx.root.findtext(f"os/{tag}")
        if text is not None and text.strip():
            out += [opt, text.strip()]
    if out and out[0] != "-kernel":
        raise XMLError("<initrd> and <cmdline> need a <kernel>")
    return out


def _pm_args(ctx: _Ctx) -> list[str]:
    pm = ctx.root.find("pm")
    if pm is None:
        return []
    _check_children(pm, frozenset({"suspend-to-mem", "suspend-to-disk"}), "pm")
    dev = "ICH9-LPC" if ctx.machine.q35 else "PIIX4_PM"
    out = []
    for tag, prop in (("suspend-to-mem", "disable_s3"), ("suspend-to-disk", "disable_s4")):
        el = pm.find(tag)
        if el is not None:
            out += ["-global", f"{dev}.{prop}={1 if el.get('enabled') == 'no' else 0}"]
    return out


def _lifecycle_args(ctx: _Ctx) -> list[str]:
    on_reboot = (ctx.root.findtext("on_reboot") or "restart").strip()
    if on_reboot == "destroy":
        return ["-no-reboot"]
    if on_reboot != "restart":
        raise unsupported(f"on_reboot '{on_reboot}' is not supported")
    return []


# ------------------------------------------------------------------------ controllers


def _controller_args(ctx: _Ctx) -> list[str]:
    out: list[str] = []
    controllers = list(ctx.root.iterfind("devices/controller"))
    # PCI buses first, by index: every other device may sit on one of them
    pci = sorted(
        (c for c in controllers if c.get("type") == "pci"),
        key=lambda c: _int(c.get("index"), "controller index"),
    )
    for ctl in pci + [c for c in controllers if c.get("type") != "pci"]:
        out += _CONTROLLERS.get(ctl.get("type", ""), _controller_unknown)(ctx, ctl)
    return out


def _controller_unknown(ctx: _Ctx, ctl: etree._Element) -> list[str]:
    raise unsupported(f"controller type '{ctl.get('type')}' is not supported")


# Attributes a controller may carry besides type, index and model; its <driver>'s
# attributes (virtio-scsi's, as QEMU properties); the QEMU devices a PCI controller's
# <model name> may name; the attributes of a PCI controller's <target>.
_CONTROLLER_ATTRS = {"usb": frozenset({"ports"}), "virtio-serial": frozenset({"ports", "vectors"})}
_SCSI_DRIVER = {"queues": "num_queues", "cmd_per_lun": "cmd_per_lun",
                "max_sectors": "max_sectors", "ioeventfd": "ioeventfd"}  # fmt: skip
_PCI_MODEL_NAMES = {
    "pcie-root-port": ("pcie-root-port", "ioh3420"),
    "pci-bridge": ("pci-bridge",),
    "dmi-to-pci-bridge": ("i82801b11-bridge",),
    "pcie-to-pci-bridge": ("pcie-pci-bridge",),
}
_PCI_TARGET_ATTRS = {"pcie-root-port": frozenset({"chassis", "port"}),
                     "pci-bridge": frozenset({"chassisNr"})}  # fmt: skip


def _check_controller(ctl: etree._Element) -> None:
    kind, model = ctl.get("type", ""), ctl.get("model", "")
    common = frozenset({"type", "index", "model"})
    _check_attrs(ctl, common | _CONTROLLER_ATTRS.get(kind, frozenset()), "controller")
    if kind == "usb" and ctl.get("ports") is not None and not model.endswith("xhci"):
        raise unsupported(f"USB controller model '{model or 'piix3-uhci'}' has no 'ports' setting")
    _controller_driver_props(ctl)
    _pci_controller_device(ctl)
    allowed = _PCI_TARGET_ATTRS.get(model, frozenset()) if kind == "pci" else frozenset()
    _check_attrs(ctl.find("target"), allowed, "controller target")
    _check_children(ctl.find("target"), frozenset(), "target")


def _controller_driver_props(ctl: etree._Element) -> dict[str, str | int | None]:
    """virtio-scsi's <driver queues cmd_per_lun max_sectors ioeventfd> as QEMU properties;
    any other <driver> attribute, of any controller, is refused (iothread too: no
    <iothreads> are supported)."""
    driver = ctl.find("driver")
    if driver is None:
        return {}
    allowed = _SCSI_DRIVER if ctl.get("type") == "scsi" else {}
    props: dict[str, str | int | None] = {}
    for key in sorted(str(k) for k in driver.attrib):
        if key not in allowed:
            why = " (no <iothreads> are supported)" if key == "iothread" else ""
            raise unsupported(f"controller driver attribute '{key}' is not supported{why}")
        value = driver.get(key, "")
        what = f"controller driver {key}"
        props[allowed[key]] = _on_off(value, what) if key == "ioeventfd" else _int(value, what)
    return props


def _pci_controller_device(ctl: etree._Element) -> str | None:
    """The QEMU device of a PCI controller: its <model name> (one of those libvirt knows for
    the model), else the model's own; None for the root buses and non-PCI controllers."""
    model = ctl.get("model", "")
    name_el = ctl.find("model")
    if name_el is None:
        return _PCI_CONTROLLERS.get(model) if ctl.get("type") == "pci" else None
    _check_attrs(name_el, frozenset({"name"}), "controller model")
    name = name_el.get("name", "")
    if ctl.get("type") != "pci" or name not in _PCI_MODEL_NAMES.get(model, ()):
        raise unsupported(f"controller model name '{name}' is not supported for model '{model}'")
    return name


def _controller_pci(ctx: _Ctx, ctl: etree._Element) -> list[str]:
    model = ctl.get("model", "")
    index = _int(ctl.get("index"), "controller index")
    root_model = "pcie-root" if ctx.machine.q35 else "pci-root"
    if model == root_model and index == 0:
        return []  # the machine's own root bus
    if model not in _PCI_CONTROLLERS or index == 0:
        raise unsupported(f"PCI controller model '{model}' is not supported here")
    target = ctl.find("target")
    get = (lambda k: None) if target is None else target.get
    props: dict[str, str | int | None] = {"id": f"pci.{index}"}
    if model == "pcie-root-port":
        props = {"port": get("port") or f"0x{index + 0xF:x}", "chassis": get("chassis") or index}
        props["id"] = f"pci.{index}"
    elif model == "pci-bridge":
        props = {"chassis_nr": get("chassisNr") or index, "id": f"pci.{index}"}
    device = _pci_controller_device(ctl) or _PCI_CONTROLLERS[model]
    return ["-device", _opts(device, **props, **ctx.pci(ctl))]


def _controller_usb(ctx: _Ctx, ctl: etree._Element) -> list[str]:
    model = ctl.get("model", "piix3-uhci")
    if model == "none":
        return []
    if model not in _USB_MODELS:
        raise unsupported(f"USB controller model '{model}' is not supported")
    index = _int(ctl.get("index"), "controller index")
    name = "usb" if index == 0 else f"usb{index}"
    master = ctl.find("master")
    props: dict[str, str | int | None] = {"id": name}
    if master is not None:
        props = {"masterbus": f"{name}.0", "firstport": master.get("startport", "0")}
    if model.endswith("xhci") and ctl.get("ports"):
        props.update(p2=ctl.get("ports"), p3=ctl.get("ports"))
    return ["-device", _opts(_USB_MODELS[model], **props, **ctx.pci(ctl))]


def _controller_scsi(ctx: _Ctx, ctl: etree._Element) -> list[str]:
    model = ctl.get("model", "virtio-scsi")
    if model != "virtio-scsi":
        raise unsupported(f"SCSI controller model '{model}' is not supported")
    index = _int(ctl.get("index"), "controller index")
    driver = _controller_driver_props(ctl)
    return ["-device", _opts("virtio-scsi-pci", id=f"scsi{index}", **driver, **ctx.pci(ctl))]


def _controller_virtio_serial(ctx: _Ctx, ctl: etree._Element) -> list[str]:
    index = _int(ctl.get("index"), "controller index")
    limits: dict[str, str | int | None] = {}
    for attr, prop in (("ports", "max_ports"), ("vectors", "vectors")):
        if ctl.get(attr) is not None:
            limits[prop] = _int(ctl.get(attr), f"virtio-serial controller {attr}")
    dev = _opts("virtio-serial-pci", id=f"virtio-serial{index}", **limits, **ctx.pci(ctl))
    return ["-device", dev]


def _controller_sata(ctx: _Ctx, ctl: etree._Element) -> list[str]:
    index = _int(ctl.get("index"), "controller index")
    if ctx.machine.q35:
        if index != 0:
            raise unsupported("only q35's built-in SATA controller is supported")
        return []  # ICH9's AHCI, bus "ide"
    return ["-device", _opts("ich9-ahci", id=f"sata{index}", **ctx.pci(ctl))]


def _controller_ide(ctx: _Ctx, ctl: etree._Element) -> list[str]:
    if ctx.machine.q35 or _int(ctl.get("index"), "controller index") != 0:
        raise unsupported("IDE controllers are unsupported for this QEMU binary or machine type")
    return []  # PIIX3's IDE, buses ide.0 and ide.1


_CONTROLLERS: dict[str, Callable[[_Ctx, etree._Element], list[str]]] = {
    "pci": _controller_pci,
    "usb": _controller_usb,
    "scsi": _controller_scsi,
    "virtio-serial": _controller_virtio_serial,
    "sata": _controller_sata,
    "ide": _controller_ide,
}


# ------------------------------------------------------------------------ disks

_DISK_NAME = re.compile(r"^(vd|sd|hd|xvd)([a-z]+)$")
_DRIVER_ATTRS = frozenset({"name", "type", "cache", "io", "discard"})


def _disk_index(disk: etree._Element) -> int:
    """vda -> 0, sdb -> 1, hdaa -> 26: libvirt's virDiskNameToIndex."""
    target = disk.find("target")
    name = "" if target is None else target.get("dev", "")
    m = _DISK_NAME.match(name)
    if m is None:
        raise XMLError(f"invalid disk target dev '{name}'")
    index = 0
    for ch in m.group(2):
        index = index * 26 + (ord(ch) - ord("a") + 1)
    return index - 1


def _disk_source(disk: etree._Element) -> str:
    src = disk.find("source")
    kind = disk.get("type", "file")
    if kind not in ("file", "block"):
        raise unsupported(f"disk type '{kind}' is not supported")
    if src is None:
        return ""
    return src.get("file" if kind == "file" else "dev", "")


def _disk_driver(disk: etree._Element) -> etree._Element:
    driver = disk.find("driver")
    if driver is None:
        return etree.Element("driver")
    extra = sorted({str(k) for k in driver.attrib} - _DRIVER_ATTRS)
    if extra:
        raise unsupported(f"disk driver attribute '{extra[0]}' is not supported")
    if driver.get("name", "qemu") != "qemu":
        raise unsupported(f"disk driver name '{driver.get('name')}' is not supported")
    if driver.get("type", "raw") not in ("raw", "qcow2"):
        raise unsupported(f"disk format '{driver.get('type')}' is not supported")
    cache, io = driver.get("cache"), driver.get("io")
    if cache is not None and cache not in _CACHE:
        raise unsupported(f"disk cache mode '{cache}' is not supported")
    if io is not None and io not in ("native", "threads", "io_uring"):
        raise unsupported(f"disk io mode '{io}' is not supported")
    if io == "native" and not (cache and _CACHE[cache][0]):
        raise unsupported("native I/O needs either no disk cache or directsync cache mode")
    if driver.get("discard", "unmap") not in ("unmap", "ignore"):
        raise unsupported(f"disk discard mode '{driver.get('discard')}' is not supported")
    return driver


def _blockdevs(ctx: _Ctx, disk: etree._Element, path: str, driver: etree._Element) -> list[str]:
    """The storage and format nodes of a disk with media (libvirt's node names, which the
    storage copy and block jobs address)."""
    ctx.disk_nodes += 1
    n = ctx.disk_nodes
    cdrom = disk.get("device") == "cdrom"
    block = {True: "host_cdrom", False: "host_device"}[cdrom] if disk.get("type") == "block" else ""
    shared: dict[str, Any] = {}
    if driver.get("discard"):
        shared["discard"] = driver.get("discard")
    cache = driver.get("cache")
    if cache is not None:
        shared["cache"] = {"direct": _CACHE[cache][0], "no-flush": _CACHE[cache][1]}
    storage: dict[str, Any] = {
        "driver": block or "file",
        "filename": path,
        "node-name": f"libvirt-{n}-storage",
        "auto-read-only": True,
        **shared,
    }
    if driver.get("io"):
        storage["aio"] = driver.get("io")
    readonly = cdrom or disk.find("readonly") is not None
    fmt = {
        "node-name": f"libvirt-{n}-format",
        "read-only": readonly,
        **shared,
        "driver": driver.get("type", "raw"),
        "file": f"libvirt-{n}-storage",
    }
    return ["-blockdev", _json(storage), "-blockdev", _json(fmt)]


_TARGET_ATTRS = frozenset({"dev", "bus", "tray", "removable", "rotation_rate"})


def _check_disk(disk: etree._Element) -> None:
    """What a disk's attributes ask that its front end cannot do, refused with libvirt's
    texts (the front end's own properties: _disk_target_props)."""
    _disk_target_props(disk)
    src = disk.find("source")
    policy = None if src is None else src.get("startupPolicy")
    if policy in ("optional", "requisite"):
        raise unsupported(
            f"disk startupPolicy '{policy}' is not supported (a source that is missing "
            "fails the start, as with 'mandatory')"
        )
    if policy not in (None, "mandatory"):
        raise XMLError(f"unknown startupPolicy value '{policy}'")
    bus = _target_bus(disk)
    readonly = disk.find("readonly") is not None
    if readonly and disk.get("device", "disk") == "disk" and bus in ("ide", "sata"):
        raise unsupported(f"readonly {bus} disks are not supported")


def _disk_target_props(disk: etree._Element) -> dict[str, str | int | None]:
    """removable= and rotation_rate= of the front end, from <target> (libvirt's mapping);
    tray='closed' is how every cdrom starts."""
    target = disk.find("target")
    if target is None:
        return {}
    _check_attrs(target, _TARGET_ATTRS, "disk target")
    device, bus = disk.get("device", "disk"), _target_bus(disk)
    tray = target.get("tray")
    if tray is not None and device != "cdrom":
        raise unsupported("tray is only valid for cdrom and floppy")
    if tray not in (None, "closed"):
        raise unsupported(f"disk tray '{tray}' is not supported (a cdrom starts closed)")
    props: dict[str, str | int | None] = {}
    removable = target.get("removable")
    if removable is not None:
        if bus != "scsi" or device != "disk":
            raise XMLError("removable is only valid for usb or scsi disks")
        props["removable"] = _on_off(removable, "disk target removable")
    rate = target.get("rotation_rate")
    if rate is not None:
        if bus not in _DRIVE_BUSES:
            raise unsupported("rotation rate is only valid for SCSI/IDE/SATA bus")
        if device != "disk":
            raise unsupported("rotation rate is only valid for disk device")
        value = _int(rate, "disk target rotation_rate")
        if not 1 <= value <= 0xFFFF:
            raise XMLError(f"invalid value '{rate}' for disk target rotation_rate")
        props["rotation_rate"] = value
    return props


def _disk_frontend(ctx: _Ctx, disk: etree._Element) -> tuple[str, dict[str, str | int | None]]:
    """(device, its properties) of the disk's bus."""
    bus, index = _target_bus(disk), _disk_index(disk)
    cdrom = disk.get("device", "disk") == "cdrom"
    if bus == "virtio" and not cdrom:
        return "virtio-blk-pci", {**ctx.pci(disk), "id": f"virtio-disk{index}"}
    # place_devices gave every disk of these buses its drive address (checked there)
    ctl, ide_bus, target, unit = _drive_address(disk) or default_drive_address(bus, index)
    if bus == "ide" and not ctx.machine.q35:
        dev = "ide-cd" if cdrom else "ide-hd"
        return dev, {"bus": f"ide.{ide_bus}", "unit": unit, "id": f"ide0-{ide_bus}-{unit}"}
    if bus == "sata":
        name = "ide" if ctx.machine.q35 else f"sata{ctl}"
        dev = "ide-cd" if cdrom else "ide-hd"
        return dev, {"bus": f"{name}.{unit}", "id": f"sata{ctl}-0-{unit}"}
    if bus == "scsi":
        dev = "scsi-cd" if cdrom else "scsi-hd"
        props: dict[str, str | int | None] = {"bus": f"scsi{ctl}.0", "channel": 0}
        props.update({"scsi-id": target, "lun": unit})
        return dev, {**props, "id": f"scsi{ctl}-0-{target}-{unit}"}
    if bus == "ide":
        raise unsupported("IDE controllers are unsupported for this QEMU binary or machine type")
    raise unsupported(f"disk bus '{bus}' is not supported for {disk.get('device', 'disk')}")


def _disk(ctx: _Ctx, disk: etree._Element) -> list[str]:
    device = disk.get("device", "disk")
    if device not in ("disk", "cdrom"):
        raise unsupported(f"disk device '{device}' is not supported")
    path = _disk_source(disk)
    driver = _disk_driver(disk)
    if not path and device == "disk":
        raise XMLError("a disk needs a <source> (only a cdrom may be empty)")
    backend = _blockdevs(ctx, disk, path, driver) if path else []
    dev, props = _disk_frontend(ctx, disk)
    if backend:
        props["drive"] = f"libvirt-{ctx.disk_nodes}-format"
    props.update(_disk_target_props(disk))
    serial = disk.findtext("serial")
    if serial:
        props["serial"] = serial.strip()
    if disk.find("shareable") is not None:
        props["share-rw"] = "on"
    boot = disk.find("boot")
    if boot is not None:
        props["bootindex"] = _int(boot.get("order"), "boot order")
    cache = driver.get("cache")
    if cache is not None and path and device == "disk":
        props["write-cache"] = "on" if _CACHE[cache][2] else "off"
    return [*backend, "-device", _opts(dev, **props)]


def _disk_args(ctx: _Ctx) -> list[str]:
    out: list[str] = []
    for disk in ctx.root.iterfind("devices/disk"):
        out += _disk(ctx, disk)
    return out


@dataclasses.dataclass(frozen=True)
class DiskNodes:
    """How the running QEMU names one disk: its device id (libvirt's alias) and its block
    nodes. Storage copy addresses them: the destination exports the format node under
    libvirt's export name, the source mirrors its format node into that export."""

    target: str  # <target dev=...>
    alias: str  # the device id: virtio-disk0, sata0-0-1 ...
    format_node: str  # libvirt-N-format
    storage_node: str  # libvirt-N-storage

    @property
    def export(self) -> str:
        """libvirt's NBD export (and mirror job) name: "drive-" + the alias."""
        return f"drive-{self.alias}"


def disk_nodes(domain: DomainDef | etree._Element) -> dict[str, DiskNodes]:
    """The disks with media, by target, named as :func:`build_argv` names them (the same
    walk: nodes are numbered in document order, over disks with a source only)."""
    root = place_devices(domain)
    ctx = _Ctx(root, HostFacts(), _machine(root))
    out: dict[str, DiskNodes] = {}
    for disk in root.iterfind("devices/disk"):
        path = _disk_source(disk)
        if path:
            ctx.disk_nodes += 1
        _, props = _disk_frontend(ctx, disk)
        dev = disk.find("target")
        if path and dev is not None:
            n, target = ctx.disk_nodes, dev.get("dev", "")
            alias = str(props["id"])
            out[target] = DiskNodes(target, alias, f"libvirt-{n}-format", f"libvirt-{n}-storage")
    return out


# ------------------------------------------------------------------------ network


def tap_name(uuid: str, index: int) -> str:
    """The tap device of a domain's ``index``-th interface: at most 15 bytes (IFNAMSIZ),
    stable across starts, unique per domain."""
    return f"vm{uuid.replace('-', '')[:8]}n{index}"


def _nic_tap(nic: etree._Element, uuid: str, index: int) -> str:
    target = nic.find("target")
    dev = "" if target is None else target.get("dev", "")
    # libvirt ignores (and regenerates) the names it gives itself: vnetN, macvtapN
    if dev and not dev.startswith(("vnet", "macvtap")):
        if len(dev.encode()) > 15 or not re.fullmatch(r"[A-Za-z0-9_.-]+", dev):
            raise XMLError(f"invalid interface target dev '{dev}'")
        return dev
    return tap_name(uuid, index)


def planned_taps(
    domain: DomainDef | etree._Element, networks: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """(tap, bridge) for each interface that needs a tap; bridge None: an ``ethernet``
    interface, whose tap is the administrator's (created if missing, attached nowhere)."""
    root = _root(domain)
    uuid = (root.findtext("uuid") or "").strip()
    out: list[tuple[str, str | None]] = []
    for i, nic in enumerate(root.iterfind("devices/interface")):
        kind = nic.get("type", "")
        if kind == "user":
            continue
        out.append((_nic_tap(nic, uuid, i), _nic_bridge(nic, kind, networks)))
    return out


def _nic_bridge(nic: etree._Element, kind: str, networks: Mapping[str, str]) -> str | None:
    src = nic.find("source")
    if kind == "bridge":
        bridge = "" if src is None else src.get("bridge", "")
        if not bridge:
            raise XMLError("interface of type 'bridge' needs <source bridge=...>")
        return bridge
    if kind == "network":
        name = "" if src is None else src.get("network", "")
        if name not in networks:
            raise unsupported(f"network '{name}' is not configured on this host (networks)")
        return networks[name]
    if kind == "ethernet":
        return None
    raise unsupported(f"interface type '{kind}' is not supported")


def _nic_args(ctx: _Ctx) -> list[str]:
    out: list[str] = []
    uuid = (ctx.root.findtext("uuid") or "").strip()
    for i, nic in enumerate(ctx.root.iterfind("devices/interface")):
        kind = nic.get("type", "")
        if kind == "user":
            netdev = _opts("user", id=f"hostnet{i}")
        else:
            _nic_bridge(nic, kind, ctx.facts.networks)  # refuses an unknown network
            tap = _nic_tap(nic, uuid, i)
            netdev = _opts("tap", id=f"hostnet{i}", ifname=tap, script="no", downscript="no")
        model_el = nic.find("model")
        model = "rtl8139" if model_el is None else model_el.get("type", "rtl8139")
        if model not in _NIC_MODELS:
            raise unsupported(f"interface model '{model}' is not supported")
        mac = nic.find("mac")
        props: dict[str, str | int | None] = {
            "netdev": f"hostnet{i}",
            "id": f"net{i}",
            "mac": None if mac is None else mac.get("address"),
            **ctx.pci(nic),
        }
        boot = nic.find("boot")
        if boot is not None:
            props["bootindex"] = _int(boot.get("order"), "boot order")
        out += ["-netdev", netdev, "-device", _opts(_NIC_MODELS[model], **props)]
    return out


def create_tap(tap: str, bridge: str | None, uid: int | None = None) -> bool:
    """Create ``tap`` (owned by the emulator's ``uid``) and attach it to ``bridge``;
    False when it existed already (an ``ethernet`` interface's, left as it is)."""
    if _run_ip("link", "show", "dev", tap, check=False) == 0:
        if bridge is not None:
            _run_ip("link", "set", "dev", tap, "master", bridge, "up")
        return False
    owner = [] if uid is None else ["user", str(uid)]
    _run_ip("tuntap", "add", "dev", tap, "mode", "tap", *owner)
    try:
        if bridge is not None:
            _run_ip("link", "set", "dev", tap, "master", bridge)
        _run_ip("link", "set", "dev", tap, "up")
    except OperationFailed:
        delete_tap(tap)
        raise
    return True


def delete_tap(tap: str) -> None:
    _run_ip("tuntap", "del", "dev", tap, "mode", "tap", check=False)


def _run_ip(*args: str, check: bool = True) -> int:
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise OperationFailed(f"cannot run ip: {exc}") from exc
    if check and r.returncode != 0:
        raise OperationFailed(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.returncode


# ------------------------------------------------------------------------ character devices


def _log_path(ctx: _Ctx, el: etree._Element, port: int) -> str | None:
    log = el.find("log")
    if log is not None and log.get("file"):
        return log.get("file")
    if not ctx.facts.console_log:
        return None
    return ctx.facts.console_log if port == 0 else f"{ctx.facts.console_log}.{port}"


def _chardev(ctx: _Ctx, el: etree._Element, chid: str, log: str | None, auto: str = "") -> str:
    kind = el.get("type", "pty")
    src = el.find("source")
    path = None if src is None else src.get("path")
    logs: dict[str, str | int | None] = {"logfile": log, "logappend": "on" if log else None}
    if kind == "pty":
        return _opts("pty", id=chid, **logs)
    if kind == "null":
        return _opts("null", id=chid, **logs)
    if kind == "file":
        if not path:
            raise XMLError(f"<{_local(el)} type='file'> needs <source path=...>")
        append = "on" if src is not None and src.get("append") == "on" else None
        return _opts("file", id=chid, path=path, append=append, **logs)
    if kind == "unix":
        if not path and not auto:
            raise XMLError(f"<{_local(el)} type='unix'> needs <source path=...>")
        path = path or auto
        server = "on" if src is None or src.get("mode", "bind") == "bind" else "off"
        wait = "off" if server == "on" else None
        return _opts("socket", id=chid, path=path, server=server, wait=wait, **logs)
    raise unsupported(f"character device type '{kind}' is not supported")


def _serial_ports(ctx: _Ctx) -> list[tuple[int, etree._Element]]:
    """Serial ports, and a serial console with no <serial> (libvirt adds the serial)."""
    serials = list(ctx.root.iterfind("devices/serial"))
    if not serials:
        serials = [c for c in ctx.root.iterfind("devices/console") if _console_kind(c) == "serial"][
            :1
        ]
    out = []
    for i, ser in enumerate(serials):
        target = ser.find("target")
        ttype = "isa-serial" if target is None else target.get("type", "isa-serial")
        if _local(ser) == "serial" and ttype != "isa-serial":
            raise unsupported(f"serial target type '{ttype}' is not supported")
        out.append((_int(None if target is None else target.get("port"), "serial port", i), ser))
    return out


def _console_kind(console: etree._Element) -> str:
    target = console.find("target")
    return "serial" if target is None else target.get("type", "serial")


def _chardev_args(ctx: _Ctx) -> list[str]:
    out: list[str] = []
    for port, ser in _serial_ports(ctx):
        chid = f"charserial{port}"
        out += ["-chardev", _chardev(ctx, ser, chid, _log_path(ctx, ser, port))]
        out += ["-device", _opts("isa-serial", chardev=chid, id=f"serial{port}", index=port)]
    for i, con in enumerate(ctx.root.iterfind("devices/console")):
        kind = _console_kind(con)
        if kind == "serial":
            continue  # the serial port above
        if kind != "virtio":
            raise unsupported(f"console target type '{kind}' is not supported")
        chid = f"charconsole{i}"
        out += ["-chardev", _chardev(ctx, con, chid, _log_path(ctx, con, 100 + i))]
        dev = _opts("virtconsole", bus="virtio-serial0.0", chardev=chid, id=f"console{i}")
        out += ["-device", dev]
    for i, chan in enumerate(ctx.root.iterfind("devices/channel")):
        target = chan.find("target")
        if target is None or target.get("type") != "virtio":
            raise unsupported("only virtio channels are supported")
        chid = f"charchannel{i}"
        serport = _opts("virtserialport", bus="virtio-serial0.0", nr=i + 1, chardev=chid,
                        id=f"channel{i}", name=target.get("name"))  # fmt: skip
        auto = f"{ctx.facts.channel_prefix}{i}"
        out += ["-chardev", _chardev(ctx, chan, chid, None, auto), "-device", serport]
    return out


# ------------------------------------------------------------------------ display and others


_VNC_ATTRS = frozenset({"type", "port", "autoport", "listen", "keymap", "sharePolicy"})
_VNC_SHARE = frozenset({"allow-exclusive", "force-shared", "ignore"})


def _check_graphics(g: etree._Element) -> None:
    """One VNC display, with the attributes _graphics_args maps; the rest (passwd,
    websocket, socket, ...) refused by name."""
    if g.get("type") != "vnc":
        raise unsupported(f"graphics type '{g.get('type')}' is not supported (VNC only)")
    _check_attrs(g, _VNC_ATTRS, "VNC")
    share = g.get("sharePolicy")
    if share is not None and share not in _VNC_SHARE:
        raise XMLError(f"unknown vnc display sharing policy '{share}'")
    keymap = g.get("keymap")
    if keymap is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", keymap):
        raise XMLError(f"invalid VNC keymap '{keymap}'")
    for child in g.iterfind("listen"):
        if child.get("type", "address") != "address":
            raise unsupported(f"VNC listen type '{child.get('type')}' is not supported")


def _graphics_args(ctx: _Ctx) -> list[str]:
    graphics = list(ctx.root.iterfind("devices/graphics"))
    if not graphics:
        return []
    g = graphics[0]
    if len(graphics) > 1:
        raise unsupported("only one <graphics> device is supported")
    _check_graphics(g)
    listen = g.get("listen")
    for child in g.iterfind("listen"):
        listen = child.get("address", listen)
    listen = listen or "127.0.0.1"
    autoport = g.get("autoport") == "yes" or g.get("port", "-1") == "-1"
    port = ctx.facts.vnc_port if autoport else _int(g.get("port"), "VNC port")
    if port is None or port < VNC_BASE_PORT:
        raise unsupported(f"VNC port {port} is not usable (no port picked, or below 5900)")
    host = f"[{listen}]" if ":" in listen else listen
    vnc = _opts(f"{host}:{port - VNC_BASE_PORT}", share=g.get("sharePolicy"))
    keymap = g.get("keymap")
    return ["-vnc", vnc, *(["-k", keymap] if keymap else [])]


# Attributes of a <video><model> besides type, heads and primary, per model
_VIDEO_ATTRS = {
    "vga": frozenset({"vram"}),
    "cirrus": frozenset({"vram"}),
    "bochs": frozenset({"vram"}),
    "virtio": frozenset(),
    "qxl": frozenset({"ram", "vram", "vgamem", "vram64"}),
    "none": frozenset(),
}


def _video_args(ctx: _Ctx) -> list[str]:
    videos = list(ctx.root.iterfind("devices/video"))
    if len(videos) > 1:
        raise unsupported("only one <video> device is supported")
    if not videos or _video_model(videos[0]) == "none":
        return []
    props = {"id": "video0", **_video_props(videos[0])}
    return ["-device", _opts(_VIDEO[_video_model(videos[0])], **props, **ctx.pci(videos[0]))]


def _video_props(video: etree._Element) -> dict[str, str | int | None]:
    """The display device's properties from <model> (libvirt's mapping), checked."""
    model = _video_model(video)
    if model not in _VIDEO and model != "none":
        raise unsupported(f"video model '{model}' is not supported")
    model_el = video.find("model")
    if model_el is None:
        return {}
    common = frozenset({"type", "heads", "primary"})
    _check_attrs(model_el, common | _VIDEO_ATTRS[model], f"video model '{model}'")
    _check_children(model_el, frozenset({"acceleration"}), "model")
    _check_acceleration(model_el.find("acceleration"))
    _yes_no(model_el.get("primary"), "video primary")  # the only <video> is the primary
    heads = _int(model_el.get("heads"), "video heads", 1)
    if heads < 1:
        raise XMLError(f"invalid value '{heads}' for video heads")
    if heads != 1 and model not in ("qxl", "virtio"):
        raise unsupported(f"video type '{model}' doesn't support multiple 'heads'")
    get = model_el.get
    props: dict[str, str | int | None] = {}
    if model in ("vga", "cirrus") and get("vram"):
        props["vgamem_mb"] = _int(get("vram"), "video vram") // 1024
    if model == "bochs" and get("vram"):
        props["vgamem"] = _int(get("vram"), "video vram") * 1024
    if model == "qxl":
        props.update(
            ram_size=_int(get("ram"), "qxl ram", 65536) * 1024,
            vram_size=_int(get("vram"), "qxl vram", 65536) * 1024,
            vgamem_mb=_int(get("vgamem"), "qxl vgamem", 16384) // 1024,
        )
        if get("vram64"):
            props["vram64_size_mb"] = _int(get("vram64"), "qxl vram64") // 1024
    if model in ("qxl", "virtio"):
        props["max_outputs"] = heads
    return props


def _check_acceleration(accel: etree._Element | None) -> None:
    if accel is None:
        return
    _check_attrs(accel, frozenset({"accel3d", "accel2d"}), "video acceleration")
    _yes_no(accel.get("accel2d"), "accel2d")
    _yes_no(accel.get("accel3d"), "accel3d")
    if accel.get("accel2d") == "yes":
        raise unsupported("qemu does not support the accel2d setting")
    if accel.get("accel3d") == "yes":
        raise unsupported("3d acceleration is not supported (it needs an OpenGL display)")


_INPUT_DEVICES = {
    ("tablet", "usb"): "usb-tablet",
    ("mouse", "usb"): "usb-mouse",
    ("keyboard", "usb"): "usb-kbd",
    ("tablet", "virtio"): "virtio-tablet-pci",
    ("mouse", "virtio"): "virtio-mouse-pci",
    ("keyboard", "virtio"): "virtio-keyboard-pci",
}


def _input_args(ctx: _Ctx) -> list[str]:
    out: list[str] = []
    for i, inp in enumerate(ctx.root.iterfind("devices/input")):
        kind, bus = inp.get("type", ""), inp.get("bus", "ps2")
        if bus == "ps2" and kind in ("mouse", "keyboard"):
            continue  # the i8042 every x86 machine has
        dev = _INPUT_DEVICES.get((kind, bus))
        if dev is None:
            raise unsupported(f"input device '{kind}' on bus '{bus}' is not supported")
        place: dict[str, str | int | None] = dict(ctx.pci(inp))
        if bus == "usb":
            place = {"bus": "usb.0", "port": ctx.usb_port()}
        out += ["-device", _opts(dev, id=f"input{i}", **place)]
    return out


def _balloon_args(ctx: _Ctx) -> list[str]:
    balloon = ctx.root.find("devices/memballoon")
    if balloon is None or balloon.get("model") == "none":
        return []
    props = _balloon_props(balloon)
    dev = _opts("virtio-balloon-pci", id="balloon0", **props, **ctx.pci(balloon))
    return ["-device", dev]


_BALLOON_ATTRS = frozenset({"model", "autodeflate", "freePageReporting"})


def _balloon_props(balloon: etree._Element) -> dict[str, str | int | None]:
    """autodeflate, freePageReporting and <stats period> as the balloon's properties.
    libvirt sets the statistics' period with qom-set once QEMU runs; the property on the
    command line is the same setting, in force from the start and on a migration's
    destination alike."""
    model = balloon.get("model", "virtio")
    if model not in ("virtio", "none"):
        raise unsupported(f"memballoon model '{model}' is not supported")
    if model == "none":  # no balloon: nothing of one can be set
        _check_attrs(balloon, frozenset({"model"}), "memballoon model 'none'")
        _check_children(balloon, _COMMON_CHILDREN, "memballoon model='none'")
        return {}
    _check_attrs(balloon, _BALLOON_ATTRS, "memballoon")
    props: dict[str, str | int | None] = {}
    for attr, prop in (
        ("autodeflate", "deflate-on-oom"),
        ("freePageReporting", "free-page-reporting"),
    ):
        value = balloon.get(attr)
        if value is not None:
            props[prop] = _on_off(value, f"memballoon {attr}")
    stats = balloon.find("stats")
    if stats is not None:
        _check_attrs(stats, frozenset({"period"}), "memballoon stats")
        period = _int(stats.get("period"), "memballoon stats period")
        if period < 0:
            raise XMLError(f"invalid value '{period}' for memballoon stats period")
        if period:
            props["guest-stats-polling-interval"] = period
    return props


def _rng_args(ctx: _Ctx) -> list[str]:
    out: list[str] = []
    for i, rng in enumerate(ctx.root.iterfind("devices/rng")):
        if rng.get("model", "virtio") != "virtio":
            raise unsupported(f"rng model '{rng.get('model')}' is not supported")
        backend = rng.find("backend")
        kind = "random" if backend is None else backend.get("model", "random")
        obj: dict[str, Any] = {"qom-type": f"rng-{kind}", "id": f"objrng{i}"}
        if kind == "random":
            text = "" if backend is None else (backend.text or "").strip()
            obj["filename"] = text or "/dev/urandom"
        elif kind != "builtin":
            raise unsupported(f"rng backend '{kind}' is not supported")
        rate = rng.find("rate")
        limits: dict[str, str | int | None] = {}
        if rate is not None:
            limits = {"max-bytes": rate.get("bytes"), "period": rate.get("period", "1000")}
        dev = _opts("virtio-rng-pci", rng=f"objrng{i}", id=f"rng{i}", **limits, **ctx.pci(rng))
        out += ["-object", _json(obj), "-device", dev]
    return out


def _watchdog_args(ctx: _Ctx) -> list[str]:
    dogs = list(ctx.root.iterfind("devices/watchdog"))
    if not dogs:
        return []
    dog = dogs[0]
    model, action = dog.get("model", ""), dog.get("action", "reset")
    if len(dogs) > 1 or model not in ("i6300esb", "ib700"):
        raise unsupported(f"watchdog model '{model}' is not supported (one i6300esb or ib700)")
    if action not in _WATCHDOG_ACTIONS:
        raise unsupported(f"watchdog action '{action}' is not supported")
    dev = _opts(model, id="watchdog0", **ctx.pci(dog))
    return ["-device", dev, "-action", f"watchdog={action}"]


_DEVICE_CHECKS: dict[str, Callable[[etree._Element], object]] = {
    "disk": _check_disk,
    "controller": _check_controller,
    "graphics": _check_graphics,
    "video": _video_props,
    "memballoon": _balloon_props,
}

_PARTS: tuple[Callable[[_Ctx], list[str]], ...] = (
    _name_uuid,
    _machine_args,
    _cpu_args,
    _memory_args,
    _smp_args,
    _base_args,
    _clock_args,
    _boot_args,
    _kernel_args,
    _pm_args,
    _lifecycle_args,
    _controller_args,
    _disk_args,
    _nic_args,
    _chardev_args,
    _graphics_args,
    _video_args,
    _input_args,
    _balloon_args,
    _rng_args,
    _watchdog_args,
)


def pick_vnc_port(lo: int, hi: int, host: str = "127.0.0.1") -> int:
    """A free port in ``lo..hi`` for an autoport VNC display (libvirt's autoport): the first
    one nothing listens on. QEMU binds it a moment later; a race loses to a clear error."""
    for port in range(max(lo, VNC_BASE_PORT), hi + 1):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OperationFailed(f"no free VNC port in {lo}-{hi}")


def needs_vnc_port(domain: DomainDef | etree._Element) -> bool:
    """Whether the domain has a VNC display whose port the host picks (autoport)."""
    g = _root(domain).find("devices/graphics[@type='vnc']")
    return g is not None and (g.get("autoport") == "yes" or g.get("port", "-1") == "-1")
