"""The QEMU command line from the domain XML (common/qemuargv.py), as libvirt's qemuxml2argv
tests it: tests/data/qemuargv/NAME.xml in, NAME.args out (one argument per line).

VMMIGRATE_REGEN_GOLDENS=1 rewrites the .args files from the code: for a deliberate change,
reviewed in the diff. The ``qemu`` tests then start the real QEMU with every golden's argv
(disks, kernel and sockets made in a temp dir) and ask it ``query-status``: the argv is one
QEMU 7.2 accepts, not only one we expect.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from vmmigrate.common import qemuargv
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import ConfigUnsupported, XMLError
from vmmigrate.common.qemuargv import HostFacts, build_argv, live_xml, place_devices

DATA = Path(__file__).resolve().parent.parent / "data" / "qemuargv"
GOLDENS = sorted(p.stem for p in DATA.glob("*.xml"))
QEMU = shutil.which("qemu-system-x86_64")
REGEN = os.environ.get("VMMIGRATE_REGEN_GOLDENS") == "1"

# The host facts every golden is built with.
FACTS = HostFacts(
    binary="/usr/bin/qemu-system-x86_64",
    accel="tcg",
    monitors=("/var/lib/vmmigrate/run/dom.qmp", "/var/lib/vmmigrate/run/dom.srcd.qmp"),
    console_log="/var/lib/vmmigrate/run/dom.console.log",
    channel_prefix="/var/lib/vmmigrate/run/dom.ch",
    networks={"default": "virbr0"},
    vnc_port=5901,
)


def read_xml(name: str) -> str:
    return (DATA / f"{name}.xml").read_text()


@pytest.mark.parametrize("name", GOLDENS)
def test_golden_argv(name: str) -> None:
    d = parse_domain(read_xml(name))
    argv = build_argv(d, FACTS)
    golden = DATA / f"{name}.args"
    text = "\n".join(argv) + "\n"
    if REGEN:
        golden.write_text(text)
    assert golden.exists(), f"no golden {golden.name}: run with VMMIGRATE_REGEN_GOLDENS=1"
    assert text == golden.read_text()


def test_every_golden_is_paired() -> None:
    args = sorted(p.stem for p in DATA.glob("*.args"))
    assert args == GOLDENS


def test_virt_install_guests_are_covered() -> None:
    """The three guests issue 11 names: a q35 server, a VNC desktop, an older pc guest."""
    assert {"server-q35", "desktop-q35", "legacy-pc"} <= set(GOLDENS)


# ----------------------------------------------------------------------- placement


def test_placement_is_stable_and_idempotent() -> None:
    d = parse_domain(read_xml("devices"))
    once = live_xml(d)
    twice = live_xml(parse_domain(once))
    assert once == twice
    # the placed definition builds the same argv as the one it came from
    assert build_argv(parse_domain(once), FACTS) == build_argv(d, FACTS)


def test_placement_fills_addresses_and_macs_and_keeps_written_ones() -> None:
    root = place_devices(parse_domain(read_xml("desktop-q35")))
    disk = root.find("devices/disk/address")
    assert disk is not None and disk.get("type") == "pci"
    video = root.find("devices/video/address")
    assert video is not None and video.get("slot") == "0x02"  # kept for the primary display
    slots = [a.get("slot") for a in root.iterfind("devices/*/address[@type='pci']")]
    assert len(slots) == len(set(slots))
    written = place_devices(parse_domain(read_xml("server-q35")))
    nic = written.find("devices/interface/address")
    assert nic is not None and nic.get("bus") == "0x01"
    minimal = place_devices(etree.fromstring(read_xml("devices").encode()))
    macs = [m.get("address") for m in minimal.iterfind("devices/interface/mac")]
    assert macs[0] == "52:54:00:00:00:07" and macs[1] is not None
    assert macs[1].startswith("52:54:00:")


def test_placement_adds_the_virtio_serial_controller_channels_need() -> None:
    root = place_devices(parse_domain(read_xml("kernel-boot")))
    ctl = root.find("devices/controller[@type='virtio-serial']")
    assert ctl is not None and ctl.find("address") is not None


def test_the_stored_definition_is_untouched() -> None:
    text = read_xml("desktop-q35")
    d = parse_domain(text)
    build_argv(d, FACTS)
    assert d.xml == text


def drive_addresses(root: etree._Element) -> dict[str, tuple[str | None, ...]]:
    """target dev -> (controller, bus, target, unit) of each disk's drive address."""
    out = {}
    for disk in root.iterfind("devices/disk"):
        addr = disk.find("address[@type='drive']")
        if addr is not None:
            dev = disk.find("target").get("dev")  # type: ignore[union-attr]
            out[dev] = tuple(addr.get(k) for k in ("controller", "bus", "target", "unit"))
    return out


def test_live_xml_gives_ide_sata_and_scsi_disks_libvirts_drive_addresses() -> None:
    live = etree.fromstring(live_xml(parse_domain(read_xml("drives-pc"))).encode())
    assert drive_addresses(live) == {
        "hda": ("0", "0", "0", "0"),  # ide: 2 buses x 2 units
        "hdb": ("0", "0", "0", "1"),
        "hdd": ("0", "1", "0", "0"),  # written: kept (hdd's default would be bus 1 unit 1)
        "sda": ("0", "0", "0", "0"),  # sata: one bus, unit = index
        "sdb": ("0", "0", "0", "5"),  # written: kept
        "sdc": ("0", "0", "0", "2"),  # scsi: 7 units per controller
        "sdh": ("1", "0", "0", "0"),  # index 7: the second controller
    }
    # the controllers those addresses name are added, as libvirt adds them
    added = [(c.get("type"), c.get("index"), c.get("model")) for c in live.iterfind("devices/controller")]
    assert ("sata", "0", None) in added
    assert ("scsi", "0", "virtio-scsi") in added and ("scsi", "1", "virtio-scsi") in added
    for name, expect in (("legacy-pc", {"hda": ("0", "0", "0", "0"), "hdc": ("0", "1", "0", "0")}),
                         ("sata-pc", {"sda": ("0", "0", "0", "0"), "sdb": ("0", "0", "0", "1")})):
        assert drive_addresses(place_devices(parse_domain(read_xml(name)))) == expect
    scsi = drive_addresses(place_devices(parse_domain(read_xml("scsi"))))
    assert scsi == {"sda": ("0", "0", "0", "0"), "sdb": ("0", "0", "0", "1"), "sdc": ("0", "0", "1", "0")}
    assert "vdb" not in scsi  # a virtio disk sits on PCI


def test_the_inactive_definition_has_no_decided_drive_addresses() -> None:
    d = parse_domain(read_xml("drives-pc"))
    live_xml(d)
    written = etree.fromstring(d.xml.encode())
    assert set(drive_addresses(written)) == {"hdd", "sdb"}


@pytest.mark.parametrize("name", GOLDENS)
def test_the_live_xml_builds_the_argv_of_the_inactive_one(name: str) -> None:
    """What a live migration's destination runs (the live XML) is what the source ran."""
    d = parse_domain(read_xml(name))
    live = parse_domain(live_xml(d))
    assert build_argv(live, FACTS) == build_argv(d, FACTS)
    assert live_xml(live) == live_xml(d)  # placement is an identity on its own output


@pytest.mark.parametrize(
    ("bus", "index", "address"),
    [("ide", 0, (0, 0, 0, 0)), ("ide", 1, (0, 0, 0, 1)), ("ide", 2, (0, 1, 0, 0)),
     ("ide", 3, (0, 1, 0, 1)), ("ide", 4, (1, 0, 0, 0)), ("sata", 5, (0, 0, 0, 5)),
     ("sata", 6, (1, 0, 0, 0)), ("scsi", 6, (0, 0, 0, 6)), ("scsi", 7, (1, 0, 0, 0)),
     ("scsi", 15, (2, 0, 0, 1))],
)  # fmt: skip
def test_default_drive_address_is_libvirts(bus: str, index: int, address: tuple[int, ...]) -> None:
    assert qemuargv.default_drive_address(bus, index) == address


def ide_disk(dev: str, address: str = "", bus: str = "ide") -> str:
    return (f"<disk type='file' device='disk'><source file='/{dev}.img'/>"
            f"<target dev='{dev}' bus='{bus}'/>{address}</disk>")


def drive(controller: int = 0, bus: int = 0, target: int = 0, unit: int = 0) -> str:
    return f"<address type='drive' controller='{controller}' bus='{bus}' target='{target}' unit='{unit}'/>"


DRIVE_REFUSED = {
    "duplicate written": (
        ide_disk("hda") + ide_disk("hdc", drive(0, 0, 0, 0)),
        "Found duplicate drive address for disk with target name 'hda' controller='0' bus='0' target='0' unit='0'",
    ),
    "duplicate sata": (
        ide_disk("sda", drive(unit=1), "sata") + ide_disk("sdb", bus="sata"),
        "Found duplicate drive address for disk with target name 'sda' controller='0' bus='0' target='0' unit='1'",
    ),
    "second ide controller": (ide_disk("hde"), "Only 1 IDE controller is supported"),
    "ide target": (ide_disk("hda", drive(target=1)), "target must be 0 for ide controller"),
    "ide unit": (ide_disk("hda", drive(unit=2)), "IDE drive address bus='0' unit='2' does not exist"),
    "sata bus": (ide_disk("sda", drive(bus=1), "sata"), "bus must be 0 for sata controller"),
    "sata target": (ide_disk("sda", drive(target=1), "sata"), "target must be 0 for sata controller"),
    "sata unit": (ide_disk("sda", drive(unit=6), "sata"), "SATA drive address unit='6' does not exist"),
    "scsi bus": (ide_disk("sda", drive(bus=1), "scsi"), "SCSI controller only supports 1 bus"),
    "scsi target": (ide_disk("sda", drive(target=256), "scsi"), "target='256' unit='0' is out of range"),
    "pci address on ide": (
        ide_disk("hda", "<address type='pci' domain='0' bus='0' slot='5' function='0'/>"),
        "unexpected address type for ide disk",
    ),
    "drive address on virtio": (ide_disk("vda", drive(), "virtio"), "unexpected address type for virtio disk"),
}


@pytest.mark.parametrize("case", sorted(DRIVE_REFUSED))
def test_drive_addresses_that_cannot_be_honoured_are_refused_at_define(case: str) -> None:
    devices, words = DRIVE_REFUSED[case]
    d = parse_domain(domain(devices))
    for check in (qemuargv.check_supported, lambda d: build_argv(d, FACTS)):
        with pytest.raises(ConfigUnsupported) as exc:
            check(d)
        assert words in str(exc.value)


def test_a_negative_drive_address_is_an_xml_error() -> None:
    d = parse_domain(domain(ide_disk("hda", "<address type='drive' controller='0' unit='-1'/>")))
    with pytest.raises(XMLError, match="invalid drive address of disk 'hda'"):
        qemuargv.check_supported(d)


def test_disks_of_different_buses_may_share_an_address() -> None:
    """libvirt compares drive addresses within one bus: sda on SATA and sdb on SCSI at
    0:0:0:0 are on different controllers."""
    devices = ide_disk("sda", bus="sata") + ide_disk("sdb", drive(), "scsi")
    argv = build_argv(parse_domain(domain(devices)), FACTS)
    assert "ide-hd,bus=sata0.0,id=sata0-0-0,drive=libvirt-1-format" in argv
    assert "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,id=scsi0-0-0-0,drive=libvirt-2-format" in argv


# ----------------------------------------------------------------------- refusals


def domain(devices: str = "", top: str = "", os_extra: str = "", machine: str = "pc") -> str:
    return f"""<domain type='qemu'>
  <name>refused</name>
  <uuid>6c1d6b1e-0c7a-4f3e-9d2a-0000000000ff</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}</os>{top}
  <devices>{devices}</devices>
</domain>"""


DISK = "<disk type='file' device='disk'><source file='/x.img'/><target dev='vda' bus='virtio'/>{}</disk>"

REFUSED = {
    "hostdev": (domain("<hostdev mode='subsystem' type='pci'/>"), "device <hostdev>"),
    "sound": (domain("<sound model='ich9'/>"), "device <sound>"),
    "filesystem": (domain("<filesystem type='mount'/>"), "device <filesystem>"),
    "sysinfo": (domain(top="<sysinfo type='smbios'/>"), "domain element <sysinfo>"),
    "memoryBacking": (domain(top="<memoryBacking/>"), "domain element <memoryBacking>"),
    "numatune": (domain(top="<numatune/>"), "domain element <numatune>"),
    "hyperv": (domain(top="<features><hyperv/></features>"), "element <hyperv> of <features>"),
    "loader": (domain(os_extra="<loader>/x.fd</loader>"), "element <loader> of <os>"),
    "disk iotune": (domain(DISK.format("<iotune/>")), "element <iotune> of <disk>"),
    "network disk": (
        domain("<disk type='network' device='disk'><target dev='vda' bus='virtio'/></disk>"),
        "disk type 'network'",
    ),
    "floppy": (
        domain("<disk type='file' device='floppy'><source file='/f'/><target dev='fda' bus='fdc'/></disk>"),
        "disk device 'floppy'",
    ),
    "vmdk": (domain(DISK.format("<driver name='qemu' type='vmdk'/>")), "disk format 'vmdk'"),
    "error_policy": (
        domain(DISK.format("<driver name='qemu' error_policy='stop'/>")),
        "disk driver attribute 'error_policy'",
    ),
    "native io with cache": (
        domain(DISK.format("<driver name='qemu' cache='writeback' io='native'/>")),
        "native I/O needs either no disk cache or directsync cache mode",
    ),
    "ide on q35": (
        domain("<disk type='file' device='disk'><source file='/x'/><target dev='hda' bus='ide'/></disk>", machine="q35"),
        "IDE controllers are unsupported",
    ),
    "usb disk": (
        domain("<disk type='file' device='disk'><source file='/x'/><target dev='sda' bus='usb'/></disk>"),
        "disk bus 'usb'",
    ),
    "spice": (domain("<graphics type='spice'/>"), "graphics type 'spice'"),
    "vnc password": (domain("<graphics type='vnc' passwd='x'/>"), "VNC attribute 'passwd'"),
    "direct interface": (domain("<interface type='direct'><source dev='eth0'/></interface>"), "interface type 'direct'"),
    "unknown network": (
        domain("<interface type='network'><source network='nowhere'/></interface>"),
        "network 'nowhere' is not configured on this host",
    ),
    "nic model": (domain("<interface type='user'><model type='ne2k_pci'/></interface>"), "interface model 'ne2k_pci'"),
    "bandwidth": (domain("<interface type='user'><bandwidth/></interface>"), "element <bandwidth> of <interface>"),
    "tcp serial": (domain("<serial type='tcp'><source mode='bind' host='0' service='4555'/></serial>"), "character device type 'tcp'"),
    "spicevmc channel": (domain("<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>"), "character device type 'spicevmc'"),
    "lsilogic": (domain("<controller type='scsi' index='0' model='lsilogic'/>"), "SCSI controller model 'lsilogic'"),
    "fdc": (domain("<controller type='fdc' index='0'/>"), "controller type 'fdc'"),
    "usb without controller": (domain("<input type='tablet' bus='usb'/>"), "a USB device needs"),
    "tcg cpu model": (domain(top="<cpu mode='custom'><model>Haswell</model></cpu>"), "CPU model 'Haswell' is not supported by TCG"),
    "arch": (domain().replace("x86_64", "aarch64"), "domain architecture 'aarch64'"),
    "machine": (domain(machine="virt"), "machine type 'virt'"),
    "clock offset": (domain(top="<clock offset='variable' adjustment='10'/>"), "clock offset 'variable'"),
    "watchdog model": (domain("<watchdog model='itco'/>"), "watchdog model 'itco'"),
    "watchdog action": (domain("<watchdog model='i6300esb' action='dump'/>"), "watchdog action 'dump'"),
    "video model": (domain("<video><model type='ramfb'/></video>"), "video model 'ramfb'"),
    "two videos": (domain("<video/><video/>"), "only one <video>"),
    "rng egd": (domain("<rng model='virtio'><backend model='egd' type='tcp'/></rng>"), "rng backend 'egd'"),
    "balloon model": (domain("<memballoon model='xen'/>"), "memballoon model 'xen'"),
    "on_reboot": (domain(top="<on_reboot>preserve</on_reboot>"), "on_reboot 'preserve'"),
    "maxMemory": (domain(top="<maxMemory slots='16' unit='KiB'>2097152</maxMemory>"), "<maxMemory>"),
    "genid": (domain(top="<genid/>"), "domain element <genid> is not supported"),
    "on_poweroff": (domain(top="<on_poweroff>restart</on_poweroff>"), "on_poweroff 'restart' is not supported"),
    "cpu numa": (
        domain(top="<cpu><numa><cell id='0' cpus='0' memory='131072'/></numa></cpu>"),
        "element <numa> of <cpu> is not supported",
    ),
    # what was accepted and not applied: each now mapped (tests below) or refused by name
    "balloon stats attribute": (
        domain("<memballoon model='virtio'><stats period='5' unit='s'/></memballoon>"),
        "memballoon stats attribute 'unit' is not supported",
    ),
    "balloon attribute": (domain("<memballoon model='virtio' foo='1'/>"), "memballoon attribute 'foo' is not supported"),
    "no balloon, stats": (domain("<memballoon model='none'><stats period='5'/></memballoon>"),
                          "element <stats> of <memballoon model='none'> is not supported"),
    "no balloon, autodeflate": (domain("<memballoon model='none' autodeflate='on'/>"),
                                "memballoon model 'none' attribute 'autodeflate' is not supported"),
    "controller iothread": (
        domain("<controller type='scsi' index='0' model='virtio-scsi'><driver iothread='1'/></controller>"),
        "controller driver attribute 'iothread' is not supported (no <iothreads> are supported)",
    ),
    "scsi driver packed": (
        domain("<controller type='scsi' index='0'><driver packed='on'/></controller>"),
        "controller driver attribute 'packed' is not supported",
    ),
    "virtio-serial driver": (
        domain("<controller type='virtio-serial' index='0'><driver queues='2'/></controller>"),
        "controller driver attribute 'queues' is not supported",
    ),
    "controller model name": (
        domain("<controller type='pci' index='1' model='pci-bridge'><model name='pxb'/></controller>"),
        "controller model name 'pxb' is not supported for model 'pci-bridge'",
    ),
    "model name of a usb controller": (
        domain("<controller type='usb' index='0' model='qemu-xhci'><model name='qemu-xhci'/></controller>"),
        "controller model name 'qemu-xhci' is not supported for model 'qemu-xhci'",
    ),
    "controller target attribute": (
        domain("<controller type='pci' index='1' model='pcie-root-port'><target chassis='1' hotplug='off'/></controller>", machine="q35"),
        "controller target attribute 'hotplug' is not supported",
    ),
    "usb ports on uhci": (domain("<controller type='usb' index='0' model='piix3-uhci' ports='4'/>"),
                          "USB controller model 'piix3-uhci' has no 'ports' setting"),
    "controller attribute": (domain("<controller type='sata' index='0' ports='4'/>"), "controller attribute 'ports' is not supported"),
    "video heads on vga": (domain("<video><model type='vga' heads='2'/></video>"), "video type 'vga' doesn't support multiple 'heads'"),
    "video vram on virtio": (domain("<video><model type='virtio' vram='16384'/></video>"), "video model 'virtio' attribute 'vram' is not supported"),
    "video blob": (domain("<video><model type='virtio' blob='on'/></video>"), "video model 'virtio' attribute 'blob' is not supported"),
    "video resolution": (domain("<video><model type='vga'><resolution x='800' y='600'/></model></video>"), "element <resolution> of <model> is not supported"),
    "accel3d": (domain("<video><model type='virtio'><acceleration accel3d='yes'/></model></video>"), "3d acceleration is not supported"),
    "accel2d": (domain("<video><model type='vga'><acceleration accel2d='yes'/></model></video>"), "qemu does not support the accel2d setting"),
    "rendernode": (
        domain("<video><model type='virtio'><acceleration rendernode='/dev/dri/renderD128'/></model></video>"),
        "video acceleration attribute 'rendernode' is not supported",
    ),
    "tray open": (
        domain("<disk type='file' device='cdrom'><target dev='hdc' bus='ide' tray='open'/></disk>"),
        "disk tray 'open' is not supported",
    ),
    "tray of a disk": (
        domain("<disk type='file' device='disk'><source file='/x'/><target dev='hda' bus='ide' tray='closed'/></disk>"),
        "tray is only valid for cdrom and floppy",
    ),
    "rotation rate on virtio": (domain(DISK.replace("bus='virtio'", "bus='virtio' rotation_rate='1'").format("")),
                                "rotation rate is only valid for SCSI/IDE/SATA bus"),
    "rotation rate of a cdrom": (
        domain("<disk type='file' device='cdrom'><target dev='sda' bus='sata' rotation_rate='1'/></disk>"),
        "rotation rate is only valid for disk device",
    ),
    "disk target attribute": (domain(DISK.replace("bus='virtio'", "bus='virtio' foo='x'").format("")),
                              "disk target attribute 'foo' is not supported"),
    "startupPolicy optional": (
        domain("<disk type='file' device='cdrom'><source file='/x.iso' startupPolicy='optional'/><target dev='hdc' bus='ide'/></disk>"),
        "disk startupPolicy 'optional' is not supported",
    ),
    "startupPolicy requisite": (
        domain("<disk type='file' device='cdrom'><source file='/x.iso' startupPolicy='requisite'/><target dev='hdc' bus='ide'/></disk>"),
        "disk startupPolicy 'requisite' is not supported",
    ),
    "readonly ide disk": (domain(ide_disk("hda").replace("</disk>", "<readonly/></disk>")), "readonly ide disks are not supported"),
    "readonly sata disk": (domain(ide_disk("sda", bus="sata").replace("</disk>", "<readonly/></disk>")),
                           "readonly sata disks are not supported"),
    "vnc websocket": (domain("<graphics type='vnc' websocket='5700'/>"), "VNC attribute 'websocket' is not supported"),
    "vnc passwdValidTo": (domain("<graphics type='vnc' passwdValidTo='2030-01-01T00:00:00'/>"),
                          "VNC attribute 'passwdValidTo' is not supported"),
    "rtc merge": (domain(top="<clock><timer name='rtc' tickpolicy='merge'/></clock>"), "unsupported rtc timer tickpolicy 'merge'"),
    "rtc discard": (domain(top="<clock><timer name='rtc' tickpolicy='discard'/></clock>"), "unsupported rtc timer tickpolicy 'discard'"),
    "rtc track boot": (domain(top="<clock><timer name='rtc' track='boot'/></clock>"), "unsupported rtc timer track 'boot'"),
    "pit catchup": (domain(top="<clock><timer name='pit' tickpolicy='catchup'/></clock>"), "unsupported pit tickpolicy 'catchup'"),
    "pit merge": (domain(top="<clock><timer name='pit' tickpolicy='merge'/></clock>"), "unsupported pit tickpolicy 'merge'"),
    "pit discard under tcg": (domain(top="<clock><timer name='pit' tickpolicy='discard'/></clock>"),
                              "pit tickpolicy 'discard' needs KVM's in-kernel PIT"),
    "kvmclock under tcg": (domain(top="<clock><timer name='kvmclock' present='yes'/></clock>"),
                           "clock timer 'kvmclock' needs KVM (qemu_accel kvm)"),
    "tsc frequency under tcg": (domain(top="<clock><timer name='tsc' frequency='2000000000'/></clock>"),
                                "tsc timer frequency needs KVM"),
    "tsc mode": (domain(top="<clock><timer name='tsc' mode='native'/></clock>"), "clock timer 'tsc' attribute 'mode' is not supported"),
    "hpet tickpolicy": (domain(top="<clock><timer name='hpet' tickpolicy='delay'/></clock>"),
                        "clock timer 'hpet' attribute 'tickpolicy' is not supported"),
    "timer catchup child": (
        domain(top="<clock><timer name='rtc' tickpolicy='catchup'><catchup threshold='123'/></timer></clock>"),
        "element <catchup> of <timer> is not supported",
    ),
    "clock timezone": (domain(top="<clock offset='localtime' timezone='Europe/Paris'/>"), "clock attribute 'timezone' is not supported"),
    "cpu match minimum": (domain(top="<cpu match='minimum'><model>qemu64</model></cpu>"), "CPU match 'minimum' is not supported"),
    "migratable on custom": (
        domain(top="<cpu mode='custom' migratable='on'><model>qemu64</model></cpu>"),
        "Attribute migratable is only allowed for 'host-passthrough' / 'maximum' CPU mode",
    ),
    "cpu model vendor_id": (domain(top="<cpu><model vendor_id='GenuineIntel'>qemu64</model></cpu>"),
                            "CPU model attribute 'vendor_id' is not supported"),
    "cpu deprecated_features": (domain(top="<cpu mode='host-model' deprecated_features='off'/>"),
                                "CPU attribute 'deprecated_features' is not supported"),
    "topology clusters": (
        domain(top="<cpu><topology sockets='1' clusters='1' cores='1' threads='1'/></cpu>"),
        "CPU topology attribute 'clusters' is not supported",
    ),
    "vcpu placement auto": (domain().replace("<vcpu>1</vcpu>", "<vcpu placement='auto'>1</vcpu>"),
                            "vcpu placement 'auto' is not supported"),
    "resource partition": (domain(top="<resource><partition>/production</partition></resource>"),
                           "resource partition '/production' is not supported"),
    "resource fibrechannel": (domain(top="<resource><fibrechannel appid='x'/></resource>"),
                              "element <fibrechannel> of <resource> is not supported"),
    "seclabel dynamic": (domain(top="<seclabel type='dynamic' model='selinux' relabel='yes'/>"),
                         "seclabel type 'dynamic' is not supported"),
    "seclabel default type": (domain(top="<seclabel model='apparmor'/>"), "seclabel type 'dynamic' is not supported"),
    "seclabel none relabel": (domain(top="<seclabel type='none' relabel='yes'/>"), "seclabel attribute 'relabel' is not supported"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_is_refused_naming_it(case: str) -> None:
    xml, words = REFUSED[case]
    with pytest.raises(ConfigUnsupported) as exc:
        build_argv(parse_domain(xml), FACTS)
    assert words in str(exc.value)
    if case == "unknown network":
        # the host's networks table is asked at start and Prepare (hostcheck), not at define
        qemuargv.check_supported(parse_domain(xml), FACTS.accel)
        return
    # at define, start and Prepare (the host's accelerator given), before any argv
    with pytest.raises(ConfigUnsupported) as exc:
        qemuargv.check_supported(parse_domain(xml), FACTS.accel)
    assert words in str(exc.value)


KVM = dataclasses.replace(FACTS, accel="kvm")


def argv_of(xml: str, facts: HostFacts = FACTS) -> list[str]:
    return build_argv(parse_domain(xml), facts)


def option(argv: list[str], name: str) -> list[str]:
    """Every value given to ``name`` (-device, -global, ...)."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == name]


MAPPED = {
    # (domain XML, facts, option, the value it must have)
    "bochs vram": (domain("<video><model type='bochs' vram='32768'/></video>"), FACTS, "-device",
                   "bochs-display,id=video0,vgamem=33554432,bus=pci.0,addr=0x2"),
    "virtio heads": (domain("<video><model type='virtio' heads='2'/></video>"), FACTS, "-device",
                     "virtio-vga,id=video0,max_outputs=2,bus=pci.0,addr=0x2"),
    "virtio without heads": (domain("<video><model type='virtio'/></video>"), FACTS, "-device",
                             "virtio-vga,id=video0,max_outputs=1,bus=pci.0,addr=0x2"),
    "removable off": (domain(ide_disk("sda", bus="scsi").replace("bus='scsi'", "bus='scsi' removable='off'")), FACTS,
                      "-device", "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,id=scsi0-0-0-0,drive=libvirt-1-format,removable=off"),
    "ide rotation rate": (domain(ide_disk("hda").replace("bus='ide'", "bus='ide' rotation_rate='5400'")), FACTS,
                          "-device", "ide-hd,bus=ide.0,unit=0,id=ide0-0-0,drive=libvirt-1-format,rotation_rate=5400"),
    "readonly scsi disk": (domain(ide_disk("sda", bus="scsi").replace("</disk>", "<readonly/></disk>")), FACTS,
                           "-device", "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,id=scsi0-0-0-0,drive=libvirt-1-format"),
    "autodeflate off": (domain("<memballoon model='virtio' autodeflate='off'><stats period='0'/></memballoon>"), FACTS,
                        "-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=off,bus=pci.0,addr=0x3"),
    "vnc share and keymap": (domain("<graphics type='vnc' port='5907' sharePolicy='allow-exclusive' keymap='en-gb'/>"),
                             FACTS, "-vnc", "127.0.0.1:7,share=allow-exclusive"),
    "rtc wall clock": (domain(top="<clock offset='utc'><timer name='rtc' track='wall' tickpolicy='catchup'/></clock>"),
                       FACTS, "-rtc", "base=utc,clock=host,driftfix=slew"),
    "rtc realtime": (domain(top="<clock offset='localtime'><timer name='rtc' track='realtime'/></clock>"),
                     FACTS, "-rtc", "base=localtime,clock=rt"),
    "pit delay under kvm": (domain(top="<clock><timer name='pit' tickpolicy='delay'/></clock>"), KVM, "-global",
                            "kvm-pit.lost_tick_policy=delay"),
    "pit discard under kvm": (domain(top="<clock><timer name='pit' tickpolicy='discard'/></clock>"), KVM, "-global",
                              "kvm-pit.lost_tick_policy=discard"),
    "kvmclock off under kvm, no cpu model": (domain(top="<clock><timer name='kvmclock' present='no'/></clock>"), KVM,
                                             "-cpu", "qemu64,kvmclock=off"),
    "i686's default model": (domain(top="<clock><timer name='kvmclock' present='no'/></clock>").replace("x86_64", "i686"),
                             KVM, "-cpu", "qemu32,kvmclock=off"),
    "kvmclock and tsc under kvm": (
        domain(top="<cpu mode='host-passthrough'/><clock><timer name='kvmclock' present='yes'/>"
                   "<timer name='tsc' frequency='2500000000'/></clock>"),
        KVM, "-cpu", "host,kvmclock=on,tsc-frequency=2500000000"),
    "check none": (domain(top="<cpu check='none'><model>qemu64</model></cpu>"), FACTS, "-cpu", "qemu64"),
    "check partial on passthrough": (domain(top="<cpu mode='host-passthrough' check='partial'/>"), FACTS, "-cpu", "max,enforce"),
    "passthrough checks nothing by default": (domain(top="<cpu mode='host-passthrough' migratable='on'/>"), FACTS, "-cpu", "max"),
    "maximum migratable off": (domain(top="<cpu mode='maximum' migratable='off'/>"), FACTS, "-cpu", "max,migratable=off"),
    "strict and fallback": (domain(top="<cpu match='strict'><model fallback='allow'>Nehalem</model></cpu>"), FACTS,
                            "-cpu", "Nehalem,enforce"),
    "dies": (domain(top="<cpu><topology sockets='1' dies='2' cores='1' threads='1'/></cpu>").replace(
        "<vcpu>1</vcpu>", "<vcpu>2</vcpu>"), FACTS, "-smp", "2,maxcpus=2,sockets=1,dies=2,cores=1,threads=1"),
}


@pytest.mark.parametrize("case", sorted(MAPPED))
def test_attributes_are_mapped_as_libvirt_maps_them(case: str) -> None:
    xml, facts, name, value = MAPPED[case]
    assert value in option(argv_of(xml, facts), name)


def test_a_vnc_keymap_is_qemus_keyboard_layout() -> None:
    argv = argv_of(domain("<graphics type='vnc' port='5907' keymap='en-gb'/>"))
    assert option(argv, "-k") == ["en-gb"]


def test_what_tcg_has_of_itself_adds_nothing() -> None:
    """pit delay: TCG's own PIT has no lost-tick policy; kvmclock present='no': QEMU gives a
    TCG guest none."""
    top = "<clock><timer name='pit' tickpolicy='delay'/><timer name='kvmclock' present='no'/></clock>"
    argv = argv_of(domain(top=top))
    assert "-global" not in argv and "-cpu" not in argv


XML_ERRORS = {
    "cpuset syntax": (domain().replace("<vcpu>1</vcpu>", "<vcpu cpuset='0-'>1</vcpu>"), "Failed to parse bitmap '0-'"),
    "cpuset empty": (domain().replace("<vcpu>1</vcpu>", "<vcpu cpuset='1,^1'>1</vcpu>"), "Invalid value of 'cpuset': 1,^1"),
    "on_crash": (domain(top="<on_crash>explode</on_crash>"), "invalid on_crash action 'explode'"),
    "share policy": (domain("<graphics type='vnc' sharePolicy='sometimes'/>"), "unknown vnc display sharing policy 'sometimes'"),
    "keymap": (domain("<graphics type='vnc' keymap='../../etc/x'/>"), "invalid VNC keymap '../../etc/x'"),
    "removable on ide": (domain(ide_disk("hda").replace("bus='ide'", "bus='ide' removable='on'")),
                         "removable is only valid for usb or scsi disks"),
    "removable value": (domain(ide_disk("sda", bus="scsi").replace("bus='scsi'", "bus='scsi' removable='yes'")),
                        "invalid value 'yes' for disk target removable"),
    "rotation rate 0": (domain(ide_disk("hda").replace("bus='ide'", "bus='ide' rotation_rate='0'")),
                        "invalid value '0' for disk target rotation_rate"),
    "heads 0": (domain("<video><model type='qxl' heads='0'/></video>"), "invalid value '0' for video heads"),
    "primary": (domain("<video><model type='vga' primary='maybe'/></video>"), "invalid value 'maybe' for video primary"),
    "cpu check": (domain(top="<cpu check='thorough'/>"), "Invalid check attribute for CPU specification"),
    "cpu match": (domain(top="<cpu match='loose'/>"), "Invalid match attribute for CPU specification"),
    "fallback": (domain(top="<cpu><model fallback='maybe'>qemu64</model></cpu>"), "Invalid fallback attribute"),
    "migratable": (domain(top="<cpu mode='host-passthrough' migratable='yes'/>"), "Invalid value in migratable attribute: 'yes'"),
    "startupPolicy": (domain("<disk type='file' device='cdrom'><source file='/x' startupPolicy='sometimes'/>"
                             "<target dev='hdc' bus='ide'/></disk>"), "unknown startupPolicy value 'sometimes'"),
    "stats period": (domain("<memballoon model='virtio'><stats period='-1'/></memballoon>"),
                     "invalid value '-1' for memballoon stats period"),
    "scsi queues": (domain("<controller type='scsi' index='0'><driver queues='many'/></controller>"),
                    "invalid value 'many' for controller driver queues"),
    "dies": (domain(top="<cpu><topology sockets='1' dies='2' cores='1' threads='1'/></cpu>"),
             "CPU topology doesn't match maximum vcpu count"),
    "timer present": (domain(top="<clock><timer name='hpet' present='off'/></clock>"), "invalid value 'off' for hpet timer present"),
    "rtc tickpolicy": (domain(top="<clock><timer name='rtc' tickpolicy='later'/></clock>"), "unknown timer tickpolicy 'later'"),
    "pit tickpolicy": (domain(top="<clock><timer name='pit' tickpolicy='later'/></clock>"), "unknown timer tickpolicy 'later'"),
}


@pytest.mark.parametrize("case", sorted(XML_ERRORS))
def test_malformed_attribute_values_are_xml_errors(case: str) -> None:
    xml, words = XML_ERRORS[case]
    with pytest.raises(XMLError) as exc:
        argv_of(xml)
    assert words in str(exc.value)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-3,^2", {0, 1, 3}), ("1, 5-6", {1, 5, 6}),
     ("0-7,^0,^7", set(range(1, 7)))],
)  # fmt: skip
def test_parse_cpuset_is_libvirts_syntax(text: str, cpus: set[int]) -> None:
    assert qemuargv.parse_cpuset(text) == cpus


def test_host_cpus_of_a_domain() -> None:
    assert qemuargv.host_cpus(parse_domain(domain())) is None
    pinned = domain().replace("<vcpu>1</vcpu>", "<vcpu placement='static' cpuset='1-2'>1</vcpu>")
    assert qemuargv.host_cpus(parse_domain(pinned)) == {1, 2}
    build_argv(parse_domain(pinned), FACTS)  # pinning is the spawn's, not the argv's


def test_check_full_is_enforce_under_tcg_and_refused_under_kvm() -> None:
    xml = domain(top="<cpu check='full'><model>Westmere</model><feature policy='require' name='aes'/></cpu>")
    assert option(argv_of(xml), "-cpu") == ["Westmere,aes=on,enforce"]
    with pytest.raises(ConfigUnsupported, match="CPU check 'full' is not supported under KVM"):
        qemuargv.check_supported(parse_domain(xml), "kvm")


def test_what_only_kvm_honours_is_refused_on_a_tcg_host_at_define(tmp_path: Path) -> None:
    """The host passes its accelerator to check_supported: a TCG host refuses what only KVM
    does, a KVM host maps it."""
    from vmmigrate.common.hypervisor import EmulatorSettings, QMPHypervisor

    d = parse_domain(domain(top="<clock><timer name='pit' tickpolicy='discard'/></clock>"))
    tcg = QMPHypervisor(tmp_path / "t", EmulatorSettings(default="qemu", qemu_accel="tcg"))
    with pytest.raises(ConfigUnsupported, match="pit tickpolicy 'discard' needs KVM"):
        tcg.check_definition(d)
    QMPHypervisor(tmp_path / "k", EmulatorSettings(default="qemu", qemu_accel="kvm")).check_definition(d)
    # without an accelerator (what the XML alone says) it waits for the argv
    qemuargv.check_supported(d)


def test_harmless_forms_of_seclabel_resource_and_on_crash() -> None:
    top = ("<on_crash>coredump-restart</on_crash><resource><partition>/machine</partition></resource>"
           "<seclabel type='none'/>")
    assert build_argv(parse_domain(domain(top=top)), FACTS) == build_argv(parse_domain(domain()), FACTS)


def test_mixed_boot_styles_are_an_xml_error() -> None:
    xml = domain(DISK.format("<boot order='1'/>"), os_extra="<boot dev='hd'/>")
    with pytest.raises(XMLError, match="per-device boot elements cannot be used together"):
        build_argv(parse_domain(xml), FACTS)


def test_cpu_models_tcg_cannot_run_pass_under_kvm() -> None:
    xml = domain(top="<cpu mode='custom'><model>Haswell</model></cpu>")
    argv = build_argv(parse_domain(xml), HostFacts(accel="kvm"))
    assert argv[argv.index("-cpu") + 1] == "Haswell,enforce"  # check='partial', the default
    passthrough = domain(top="<cpu mode='host-passthrough'/>")
    argv = build_argv(parse_domain(passthrough), HostFacts(accel="kvm"))
    assert argv[argv.index("-cpu") + 1] == "host"


def test_autoport_vnc_needs_a_picked_port() -> None:
    xml = domain("<graphics type='vnc' autoport='yes'/>")
    with pytest.raises(ConfigUnsupported, match="VNC port"):
        build_argv(parse_domain(xml), HostFacts())


def test_harmless_elements_are_accepted() -> None:
    top = (
        "<title>t</title><description>d</description><metadata><x xmlns='urn:x'/></metadata>"
        "<on_poweroff>destroy</on_poweroff><on_crash>restart</on_crash>"
        "<resource><partition>/machine</partition></resource>"
    )
    build_argv(parse_domain(domain(top=top)), FACTS)


def test_planned_taps() -> None:
    d = parse_domain(read_xml("kernel-boot"))
    assert qemuargv.planned_taps(d, {}) == [("vm6c1d6b1en0", "br0")]
    server = parse_domain(read_xml("server-q35"))
    assert qemuargv.planned_taps(server, {"default": "virbr0"}) == [("vm6c1d6b1en0", "virbr0")]
    devices = parse_domain(read_xml("devices"))
    assert qemuargv.planned_taps(devices, {}) == [("tapdev0", None)]


def test_pick_vnc_port_skips_a_busy_one() -> None:
    with socket.socket() as s:
        # the first free port of the VNC range, held busy while the pick runs
        for busy in range(qemuargv.VNC_BASE_PORT, qemuargv.VNC_BASE_PORT + 1000):
            try:
                s.bind(("127.0.0.1", busy))
                break
            except OSError:
                continue
        else:
            raise AssertionError("no free port in the first 1000 of the VNC range")
        assert qemuargv.pick_vnc_port(busy, busy + 20) > busy


# ----------------------------------------------------------------------- the real QEMU


def write_qcow2(path: Path, size: int) -> None:
    """An empty qcow2 (version 3, 64 KiB clusters): header, refcount table, one refcount
    block and the L1 table, each a cluster (no qemu-img on this host)."""
    cluster = 1 << 16
    l1_entries = max(1, -(-size // (cluster * (cluster // 8))))
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, 16, size, 0, l1_entries, 3 * cluster, cluster, 1, 0, 0,
        0, 0, 0, 4, 104,
    )  # fmt: skip
    data = bytearray(4 * cluster)
    data[: len(header)] = header
    struct.pack_into(">Q", data, cluster, 2 * cluster)  # refcount table -> block
    for i in range(4):
        struct.pack_into(">H", data, 2 * cluster + 2 * i, 1)  # the four clusters in use
    path.write_bytes(bytes(data))


def write_multiboot_kernel(path: Path) -> None:
    """A kernel QEMU's -kernel loads: a multiboot header (load at 1 MiB) and a halt loop."""
    magic, flags = 0x1BADB002, 0x00010000
    checksum = (-(magic + flags)) & 0xFFFFFFFF
    load = 0x100000
    header = struct.pack("<IIIIIIII", magic, flags, checksum, load, load, 0, 0, load + 32)
    path.write_bytes(header + b"\xf4\xeb\xfd" + bytes(4096))


def localize(xml: str, tmp: Path, loops: list[str]) -> str:
    """The golden with every host path moved into ``tmp``, the files made (a block disk: a
    loop device over a file there, its name appended to ``loops``)."""
    root = etree.fromstring(xml.encode())
    for i, disk in enumerate(root.iterfind("devices/disk")):
        src = disk.find("source")
        if src is None:
            continue
        driver = disk.find("driver")
        path = tmp / f"disk{i}"
        if disk.get("type") == "block":
            with path.open("wb") as f:
                f.truncate(64 << 20)
            if os.geteuid() != 0 or shutil.which("losetup") is None:
                pytest.skip("a block disk needs root and losetup (a loop device)")
            loop = subprocess.run(
                ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
            ).stdout.strip()
            loops.append(loop)
            src.set("dev", loop)
            continue
        if driver is not None and driver.get("type") == "qcow2":
            write_qcow2(path, 64 << 20)
        else:
            with path.open("wb") as f:
                f.truncate(64 << 20)
        src.set("file", str(path))
    for tag in ("kernel", "initrd"):
        el = root.find(f"os/{tag}")
        if el is not None:
            el.text = str(tmp / tag)
            write_multiboot_kernel(tmp / tag)
    for i, src in enumerate(root.iterfind("devices/*/source[@path]")):
        src.set("path", str(tmp / f"chr{i}"))
    return etree.tostring(root, encoding="unicode")


def qmp(path: Path, *commands: str) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        out = []
        for cmd in ("qmp_capabilities", *commands):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    break
            assert "return" in reply, reply
            out.append(reply["return"])
        return out


def wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the monitor accepts a connection (the socket file appears before QEMU listens)."""
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited {proc.returncode}: {log.read_text()}")
        assert time.monotonic() < deadline, "QEMU did not open its monitor"
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
            except OSError:
                time.sleep(0.02)
                continue
        return


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # unix socket paths are short: pytest's tmp_path can be too long for them
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qa-") as d:
        yield Path(d)


@pytest.mark.qemu
@pytest.mark.skipif(QEMU is None, reason="QEMU not installed")
@pytest.mark.parametrize("name", GOLDENS)
def test_qemu_accepts_golden_argv(name: str, short_tmp: Path) -> None:
    assert QEMU is not None
    loops: list[str] = []
    try:
        d = parse_domain(localize(read_xml(name), short_tmp, loops))
        start_golden(d, short_tmp, QEMU)
    finally:
        for loop in loops:
            subprocess.run(["losetup", "--detach", loop], check=False)


def start_golden(d: DomainDef, short_tmp: Path, qemu: str) -> None:
    monitor = short_tmp / "m.qmp"
    facts = HostFacts(
        binary=qemu,
        monitors=(str(monitor),),
        console_log=str(short_tmp / "console.log"),
        channel_prefix=str(short_tmp / "ch"),
        networks={"default": "virbr0"},
        vnc_port=qemuargv.pick_vnc_port(5900, 5999),
    )
    argv = [*build_argv(d, facts), "-S"]
    needs_tap = bool(qemuargv.planned_taps(d, facts.networks))
    if needs_tap:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("tap interfaces need root (QEMU creates them in a private netns)")
        # QEMU creates the taps it names; in a network namespace of its own, nothing of
        # them reaches the host
        argv = ["unshare", "--net", "--", *argv]
    log = short_tmp / "qemu.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for(monitor, proc, log)
        _, status, _ = qmp(monitor, "query-status", "quit")
        assert status == {"status": "prelaunch", "singlestep": False, "running": False}
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "warning" not in log.read_text().lower(), log.read_text()


def test_the_host_refuses_unsupported_qemu_definitions_only(tmp_path: Path) -> None:
    """define, start and Prepare ask the hypervisor's check_definition: for a QEMU domain it
    refuses what the command line cannot carry; simvm domains keep their own rules."""
    from vmmigrate.common.hypervisor import EmulatorSettings, QMPHypervisor

    xml = domain("<sound model='ich9'/>")
    qemu_host = QMPHypervisor(tmp_path / "q", EmulatorSettings(default="qemu"))
    with pytest.raises(ConfigUnsupported, match="device <sound> is not supported"):
        qemu_host.check_definition(parse_domain(xml))
    QMPHypervisor(tmp_path / "s", EmulatorSettings(default="simvm")).check_definition(
        parse_domain(xml)
    )


# ----------------------------------------------------------------------- memory


def memory_domain(current: str, balloon: str = "<memballoon model='virtio'/>") -> str:
    return domain(balloon, top=f"<currentMemory unit='MiB'>{current}</currentMemory>")


@pytest.mark.parametrize(
    ("current", "balloon", "target", "ignored"),
    [
        ("64", "<memballoon model='virtio'/>", 65536, False),  # the balloon holds it lower
        ("64", "<memballoon/>", 65536, False),  # virtio is the default model
        ("128", "<memballoon model='virtio'/>", None, False),  # = <memory>: nothing to set
        ("256", "<memballoon model='virtio'/>", None, False),  # above: libvirt clamps
        ("64", "<memballoon model='none'/>", None, True),  # no balloon: ignored, warned
        ("64", "", None, True),
    ],
)
def test_memory_plan(current: str, balloon: str, target: int | None, ignored: bool) -> None:
    plan = qemuargv.memory_plan(parse_domain(memory_domain(current, balloon)))
    assert plan.memory_kib == 131072
    assert plan.balloon_target_kib == target
    assert plan.current_ignored is ignored


def test_qemu_gets_all_of_memory_and_the_live_xml_says_what_the_guest_may_have() -> None:
    with_balloon = parse_domain(memory_domain("64"))
    argv = build_argv(with_balloon, FACTS)
    assert argv[argv.index("-m") + 1] == "size=131072k"  # the balloon takes the rest later
    live = etree.fromstring(live_xml(with_balloon).encode())
    assert (live.findtext("currentMemory"), live.find("currentMemory").get("unit")) == ("64", "MiB")  # type: ignore[union-attr]
    # without a balloon the guest keeps all of <memory>: the live XML says so (libvirt's)
    without = parse_domain(memory_domain("64", "<memballoon model='none'/>"))
    live = etree.fromstring(live_xml(without).encode())
    assert (live.findtext("currentMemory"), live.find("currentMemory").get("unit")) == ("131072", "KiB")  # type: ignore[union-attr]
    assert "<currentMemory unit='MiB'>64</currentMemory>" in without.xml  # stored: as written
    assert build_argv(parse_domain(live_xml(without)), FACTS) == build_argv(without, FACTS)
