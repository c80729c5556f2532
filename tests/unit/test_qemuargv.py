"""The QEMU command line from the domain XML (common/qemuargv.py), as libvirt's qemuxml2argv
tests it: tests/data/qemuargv/NAME.xml in, NAME.args out (one argument per line).

VMMIGRATE_REGEN_GOLDENS=1 rewrites the .args files from the code: for a deliberate change,
reviewed in the diff. The ``qemu`` tests then start the real QEMU with every golden's argv
(disks, kernel and sockets made in a temp dir) and ask it ``query-status``: the argv is one
QEMU 7.2 accepts, not only one we expect.
"""

from __future__ import annotations

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
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_is_refused_naming_it(case: str) -> None:
    xml, words = REFUSED[case]
    with pytest.raises(ConfigUnsupported) as exc:
        build_argv(parse_domain(xml), FACTS)
    assert words in str(exc.value)


def test_mixed_boot_styles_are_an_xml_error() -> None:
    xml = domain(DISK.format("<boot order='1'/>"), os_extra="<boot dev='hd'/>")
    with pytest.raises(XMLError, match="per-device boot elements cannot be used together"):
        build_argv(parse_domain(xml), FACTS)


def test_cpu_models_tcg_cannot_run_pass_under_kvm() -> None:
    xml = domain(top="<cpu mode='custom'><model>Haswell</model></cpu>")
    argv = build_argv(parse_domain(xml), HostFacts(accel="kvm"))
    assert argv[argv.index("-cpu") + 1] == "Haswell"
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
