"""hostcheck: whether this host can run a domain, checked before anything starts (the
emulator, QEMU's machine types and CPU models, the disks, the bridges), each check's pass
and refusal with its text and gRPC code. QEMU is a script printing QEMU 7.2's captured
answers (and the real binary where it is installed); sysfs is a directory of the test's."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import pytest
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import (
    ConfigUnsupported,
    HostResourceMissing,
    InvalidArgument,
    NoNetwork,
    OperationInvalid,
    StorageFull,
    VmmigrateError,
    XMLError,
    libvirt_text,
)
from vmmigrate.common.hostcheck import (
    check_runnable,
    offers_warmed,
    parse_cpu_help,
    parse_machine_help,
    qemu_offer,
    warm_qemu_offer,
)
from vmmigrate.common.hypervisor import EmulatorPolicy, EmulatorSettings

DATA = Path(__file__).parent.parent / "data" / "hostcheck"
MACHINE_HELP = (DATA / "qemu-7.2-machine-help.txt").read_text()
CPU_HELP = (DATA / "qemu-7.2-cpu-help.txt").read_text()
QEMU = shutil.which("qemu-system-x86_64")
UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def fake_qemu(where: Path, cpu_help: str = CPU_HELP) -> Path:
    """An executable answering ``-machine help`` and ``-cpu help`` as QEMU 7.2 does; each
    call is logged in ``where/calls`` (one line per probe)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "machine-help").write_text(MACHINE_HELP)
    (where / "cpu-help").write_text(cpu_help)
    script = where / "qemu-system-x86_64"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> "{where}/calls"\n'
        f'case "$1" in -machine) cat "{where}/machine-help";; -cpu) cat "{where}/cpu-help";;\n'
        '*) echo "unexpected $*" >&2; exit 1;; esac\n'
    )
    script.chmod(0o755)
    return script


def calls(where: Path) -> list[str]:
    path = where / "calls"
    return path.read_text().split() if path.exists() else []


def domain(
    *,
    machine: str = "pc",
    cpu: str = "",
    disks: str = "",
    nics: str = "",
    emulator: str = "",
) -> DomainDef:
    emu = f"<emulator>{emulator}</emulator>" if emulator else ""
    return parse_domain(
        f"""<domain type='qemu'><name>vm</name><uuid>{UUID}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>{cpu}
  <devices>{emu}{disks}{nics}</devices>
</domain>"""
    )


def qemu_settings(binary: Path, **kw: object) -> EmulatorSettings:
    return EmulatorSettings(default="qemu", qemu_binary=str(binary), **kw)  # type: ignore[arg-type]


SIMVM = EmulatorSettings(default="simvm")


def refused(
    cls: type[VmmigrateError], text: str, d: DomainDef, settings: EmulatorSettings, **kw: object
) -> VmmigrateError:
    """check_runnable refuses ``d`` with ``cls`` and exactly ``text`` as migctl prints it."""
    with pytest.raises(cls) as info:
        check_runnable(d, settings, **kw)  # type: ignore[arg-type]
    assert type(info.value) is cls
    assert libvirt_text(info.value) == text
    return info.value


@pytest.fixture
def qemu(tmp_path: Path) -> Path:
    return fake_qemu(tmp_path / "qemu")


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """A sysfs root with bridge br0 and a plain interface eth0."""
    root = tmp_path / "sys"
    (root / "class/net/br0/bridge").mkdir(parents=True)
    (root / "class/net/eth0").mkdir(parents=True)
    return root


def disk_file(path: Path | str, target: str = "vda", kind: str = "file") -> str:
    attr = "file" if kind == "file" else "dev"
    return (
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='raw'/>"
        f"<source {attr}='{path}'/><target dev='{target}' bus='virtio'/></disk>"
    )


# ------------------------------------------------------------------------ QEMU's answers


def test_machine_help_parsed_with_aliases() -> None:
    machines = parse_machine_help(MACHINE_HELP)
    assert machines["pc"] == "pc-i440fx-7.2"
    assert machines["q35"] == "pc-q35-7.2"
    assert machines["pc-i440fx-7.2"] == "pc-i440fx-7.2"
    assert machines["pc-q35-4.0.1"] == "pc-q35-4.0.1"
    assert {"isapc", "microvm", "none", "pc-i440fx-1.4"} <= machines.keys()
    assert "Supported" not in machines and "pc-i440fx-99.0" not in machines
    # every line after the header is one machine, each alias names one of them
    assert len(machines) == len(MACHINE_HELP.strip().splitlines()) - 1
    assert all(target in machines for target in machines.values())


def test_cpu_help_parsed_up_to_the_flags() -> None:
    cpus = parse_cpu_help(CPU_HELP)
    assert {"qemu64", "max", "host", "base", "486", "Broadwell-IBRS", "Skylake-Client"} <= cpus
    assert "x86" not in cpus and "3dnow" not in cpus and "Available" not in cpus
    assert not {"avx2", "vmx-ept"} & cpus  # CPUID flags, not models


@pytest.mark.skipif(QEMU is None, reason="QEMU not installed")
def test_the_installed_qemu_is_parsed() -> None:
    assert QEMU is not None
    offer = qemu_offer(QEMU)
    assert {"pc", "q35"} <= offer.machines.keys()
    assert offer.machines["pc"].startswith("pc-i440fx-")
    assert offer.machines["q35"].startswith("pc-q35-")
    assert all(target in offer.machines for target in offer.machines.values())
    assert {"qemu64", "max"} <= offer.cpus


def test_qemu_is_asked_once_per_binary_until_it_changes(tmp_path: Path) -> None:
    where = tmp_path / "q"
    binary = fake_qemu(where)
    first = qemu_offer(str(binary))
    assert qemu_offer(str(binary)) is first
    for _ in range(3):
        check_runnable(domain(), qemu_settings(binary))
    assert calls(where) == ["-machine", "-cpu"]
    # an upgraded binary (another mtime and size) is asked again
    binary.write_text(binary.read_text() + "# upgraded\n")
    os.utime(binary, ns=(1, 1))
    assert qemu_offer(str(binary)) == first
    assert calls(where) == ["-machine", "-cpu", "-machine", "-cpu"]


def test_a_failing_probe_is_an_error_and_not_remembered(tmp_path: Path) -> None:
    where = tmp_path / "q"
    binary = fake_qemu(where)
    (where / "machine-help").unlink()  # cat fails: the probe exits non-zero
    with pytest.raises(VmmigrateError, match="-machine help' failed"):
        check_runnable(domain(), qemu_settings(binary))
    (where / "machine-help").write_text(MACHINE_HELP)
    check_runnable(domain(), qemu_settings(binary))


def test_the_default_binary_is_asked_once_at_start_when_allowed(tmp_path: Path) -> None:
    """A daemon asks its default QEMU binary in the background while it serves, so that
    the first Prepare finds the answers; a binary not allowed, or not installed, is not run."""
    where = tmp_path / "q"
    binary = fake_qemu(where)
    allowed = EmulatorPolicy(allowed=frozenset({str(binary)}))

    async def serve(settings: EmulatorSettings) -> None:
        async with offers_warmed(settings):
            for _ in range(200):  # the probe runs in a thread: wait for it (at most 10 s)
                if len(calls(where)) >= 2:
                    break
                await asyncio.sleep(0.05)

    assert warm_qemu_offer(qemu_settings(binary, policy=EmulatorPolicy())) is None
    assert calls(where) == []  # not allowed: never run
    assert warm_qemu_offer(qemu_settings(tmp_path / "missing", policy=allowed)) is None
    assert calls(where) == []
    asyncio.run(serve(qemu_settings(binary, policy=allowed)))
    assert calls(where) == ["-machine", "-cpu"]
    check_runnable(domain(), qemu_settings(binary, policy=allowed))
    assert calls(where) == ["-machine", "-cpu"]  # the first check was answered from memory


# ------------------------------------------------------------------------ the emulator


def test_emulator_must_be_allowed(qemu: Path) -> None:
    d = domain(emulator=str(qemu))
    refused(
        ConfigUnsupported,
        f"unsupported configuration: emulator '{qemu}' is not allowed on this host",
        d,
        qemu_settings(qemu),
    )
    allowed = EmulatorPolicy(allowed=frozenset({str(qemu)}))
    check_runnable(d, qemu_settings(qemu, policy=allowed))


def test_emulator_must_be_installed(tmp_path: Path) -> None:
    missing = tmp_path / "no-qemu"
    exc = refused(
        HostResourceMissing,
        f"Cannot find QEMU binary {missing}: No such file or directory",
        domain(),
        qemu_settings(missing),
    )
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    missing.write_text("#!/bin/sh\n")  # there, but not executable
    refused(
        HostResourceMissing,
        f"Cannot find QEMU binary {missing}: Permission denied",
        domain(),
        qemu_settings(missing),
    )
    refused(
        HostResourceMissing,
        "Cannot find QEMU binary qemu-system-none: No such file or directory",
        domain(),
        EmulatorSettings(default="qemu", qemu_binary="qemu-system-none"),
    )


# ------------------------------------------------------------------------ machine and CPU


@pytest.mark.parametrize("machine", ["pc", "q35", "pc-i440fx-7.2", "pc-q35-4.0.1", "pc-i440fx-2.0"])
def test_machine_types_the_binary_offers(qemu: Path, machine: str) -> None:
    check_runnable(domain(machine=machine), qemu_settings(qemu))


@pytest.mark.parametrize("machine", ["pc-i440fx-99.0", "pc-q35-8.0", "virt"])
def test_machine_type_the_binary_lacks(qemu: Path, machine: str) -> None:
    exc = refused(
        ConfigUnsupported,
        f"unsupported configuration: Emulator '{qemu}' does not support machine type '{machine}'",
        domain(machine=machine),
        qemu_settings(qemu),
    )
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION


def test_no_machine_attribute_means_pc(tmp_path: Path) -> None:
    where = tmp_path / "q"
    binary = fake_qemu(where)
    (where / "machine-help").write_text("Supported machines are:\nq35  Standard PC\n")
    d = parse_domain(
        f"<domain type='qemu'><name>vm</name><uuid>{UUID}</uuid>"
        "<memory>65536</memory><os><type>hvm</type></os></domain>"
    )
    refused(
        ConfigUnsupported,
        f"unsupported configuration: Emulator '{binary}' does not support machine type 'pc'",
        d,
        qemu_settings(binary),
    )


def cpu(mode: str, model: str = "") -> str:
    inner = f"<model fallback='forbid'>{model}</model>" if model else ""
    return f"<cpu mode='{mode}' match='exact'>{inner}</cpu>"


@pytest.mark.parametrize(
    ("element", "accel"),
    [
        (cpu("custom", "qemu64"), "tcg"),
        (cpu("custom", "Nehalem"), "tcg"),
        (cpu("custom", "Skylake-Client"), "kvm"),  # KVM runs what TCG cannot
        (cpu("host-passthrough"), "tcg"),  # -cpu max under TCG
        (cpu("host-model"), "kvm"),  # -cpu host
        ("<cpu><topology sockets='1' cores='1' threads='1'/></cpu>", "tcg"),
    ],
)
def test_cpu_models_the_binary_knows(qemu: Path, element: str, accel: str) -> None:
    check_runnable(domain(cpu=element), qemu_settings(qemu, qemu_accel=accel))


def test_cpu_model_the_binary_does_not_know(qemu: Path) -> None:
    for accel in ("tcg", "kvm"):
        refused(
            ConfigUnsupported,
            "unsupported configuration: CPU model Zen9 is not supported by hypervisor",
            domain(cpu=cpu("custom", "Zen9")),
            qemu_settings(qemu, qemu_accel=accel),
        )


def test_qemuargv_refusals_are_kept(qemu: Path) -> None:
    # QEMU knows Skylake-Client, TCG cannot run it: qemuargv's refusal, before QEMU runs
    with pytest.raises(
        ConfigUnsupported, match="CPU model 'Skylake-Client' is not supported by TCG"
    ):
        check_runnable(domain(cpu=cpu("custom", "Skylake-Client")), qemu_settings(qemu))
    with pytest.raises(ConfigUnsupported, match="CPU mode 'nonsense' is not supported"):
        check_runnable(domain(cpu=cpu("nonsense")), qemu_settings(qemu))


def test_host_model_needs_the_model_it_maps_to(tmp_path: Path) -> None:
    no_max = "\n".join(line for line in CPU_HELP.splitlines() if not line.startswith("x86 max"))
    binary = fake_qemu(tmp_path / "q", cpu_help=no_max)
    refused(
        ConfigUnsupported,
        "unsupported configuration: CPU mode 'host-model' for x86_64 qemu "
        f"domain on {os.uname().machine} host is not supported by hypervisor (its QEMU has "
        "no CPU model 'max')",
        domain(cpu=cpu("host-model")),
        qemu_settings(binary),
    )


# ------------------------------------------------------------------------ disks


def test_shared_disks_must_be_here(tmp_path: Path, qemu: Path) -> None:
    image = tmp_path / "vm.img"
    image.write_bytes(b"\0" * 512)
    for settings in (SIMVM, qemu_settings(qemu)):  # simvm opens its disks too
        check_runnable(domain(disks=disk_file(image)), settings)
        missing = tmp_path / "gone.img"
        exc = refused(
            HostResourceMissing,
            f"Cannot access storage file '{missing}': No such file or directory",
            domain(disks=disk_file(image) + disk_file(missing, "vdb")),
            settings,
        )
        assert exc.code == grpc.StatusCode.FAILED_PRECONDITION


def test_block_devices_must_be_here(tmp_path: Path) -> None:
    check_runnable(domain(disks=disk_file("/dev/null", kind="block")), SIMVM)
    refused(
        HostResourceMissing,
        "Cannot access storage file '/dev/vmmigrate-none': No such file or directory",
        domain(disks=disk_file("/dev/vmmigrate-none", kind="block")),
        SIMVM,
    )


def test_cdrom_without_media_and_network_disks_are_skipped(qemu: Path) -> None:
    disks = (
        "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>"
        "<disk type='network' device='disk'><source protocol='nbd' name='x'>"
        "<host name='example.org' port='10809'/></source><target dev='vdb' bus='virtio'/></disk>"
    )
    check_runnable(domain(disks=disks), SIMVM)


def test_copied_disks_need_their_directory_and_room(tmp_path: Path) -> None:
    target = tmp_path / "images" / "vm.img"  # not there yet: the migration writes it
    d = domain(disks=disk_file(target))
    refused(
        HostResourceMissing,
        f"Cannot access directory '{target.parent}' of storage file "
        f"'{target}' (disk 'vda', copied by the migration): No such file or directory",
        d,
        SIMVM,
        copied={"vda": 1 << 20},
    )
    target.parent.mkdir()
    check_runnable(d, SIMVM, copied={"vda": 1 << 20})
    huge = 1 << 62
    with pytest.raises(StorageFull) as info:
        check_runnable(d, SIMVM, copied={"vda": huge})
    free = os.statvfs(target.parent).f_bavail * os.statvfs(target.parent).f_frsize
    assert str(info.value).startswith(
        f"not enough free space for disk 'vda' at '{target}': it needs {huge} bytes, "
        f"'{target.parent}' has "
    )
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert abs(int(str(info.value).split(" has ")[1].split()[0]) - free) < 1 << 30
    assert not target.exists()  # nothing written


def test_free_space_is_what_the_file_system_says(tiny_fs: Path) -> None:
    target = tiny_fs / "vm.img"
    d = domain(disks=disk_file(target))
    check_runnable(d, SIMVM, copied={"vda": 64 << 10})
    refused(
        StorageFull,
        f"not enough free space for disk 'vda' at '{target}': it needs 65537 "
        f"bytes, '{tiny_fs}' has 65536 bytes free",
        d,
        SIMVM,
        copied={"vda": (64 << 10) + 1},
    )


def test_copied_names_disks_of_the_domain(tmp_path: Path) -> None:
    d = domain(disks=disk_file(tmp_path / "vm.img"))
    refused(
        InvalidArgument, "invalid argument: disk target vdz not found", d, SIMVM, copied={"vdz": 1}
    )
    refused(
        InvalidArgument,
        "invalid argument: disk vda: capacity -1 is negative",
        d,
        SIMVM,
        copied={"vda": -1},
    )


# ------------------------------------------------------------------------ bridges


def nic(kind: str, source: str) -> str:
    attr = {"bridge": "bridge", "network": "network"}[kind]
    return f"<interface type='{kind}'><source {attr}='{source}'/><model type='virtio'/></interface>"


def test_bridges_must_exist(qemu: Path, sysfs: Path) -> None:
    settings = qemu_settings(qemu, networks={"default": "br0", "lab": "br9"})
    check_runnable(
        domain(nics=nic("bridge", "br0") + nic("network", "default")), settings, sys_root=sysfs
    )
    exc = refused(
        HostResourceMissing,
        "Cannot get interface MTU on 'br7': No such device (bridge "
        "'br7' of <interface type='bridge'> does not exist on this host)",
        domain(nics=nic("bridge", "br7")),
        settings,
        sys_root=sysfs,
    )
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    refused(
        HostResourceMissing,
        "network interface 'eth0' is not a bridge on this host",
        domain(nics=nic("bridge", "eth0")),
        settings,
        sys_root=sysfs,
    )


def test_networks_must_be_mapped_to_a_bridge_that_exists(qemu: Path, sysfs: Path) -> None:
    settings = qemu_settings(qemu, networks={"default": "br0", "lab": "br9"})
    exc = refused(
        NoNetwork,
        "Network not found: no network with matching name 'nowhere'",
        domain(nics=nic("network", "nowhere")),
        settings,
        sys_root=sysfs,
    )
    assert exc.code == grpc.StatusCode.NOT_FOUND
    refused(
        OperationInvalid,
        "Requested operation is not valid: network 'lab' is not active (its "
        "bridge 'br9' does not exist on this host)",
        domain(nics=nic("network", "lab")),
        settings,
        sys_root=sysfs,
    )


@pytest.mark.parametrize("name", ["../../etc", "a/b", "br 0", "x" * 16, ".."])
def test_bridge_names_are_interface_names(qemu: Path, sysfs: Path, name: str) -> None:
    with pytest.raises(XMLError, match="invalid bridge name"):
        check_runnable(domain(nics=nic("bridge", name)), qemu_settings(qemu), sys_root=sysfs)


def test_user_and_ethernet_interfaces_need_no_bridge(qemu: Path, sysfs: Path) -> None:
    nics = "<interface type='user'/><interface type='ethernet'><target dev='tap7'/></interface>"
    check_runnable(domain(nics=nics), qemu_settings(qemu), sys_root=sysfs)


# ------------------------------------------------------------------------ simvm, order


def test_simvm_ignores_machine_cpu_and_interfaces(tmp_path: Path, sysfs: Path) -> None:
    d = domain(machine="pc-i440fx-99.0", cpu=cpu("custom", "Zen9"), nics=nic("bridge", "br7"))
    check_runnable(d, SIMVM, sys_root=sysfs)
    check_runnable(domain(emulator="simvm", machine="virt"), qemu_settings(tmp_path / "none"))


def test_checks_run_in_order_and_change_nothing(tmp_path: Path, qemu: Path, sysfs: Path) -> None:
    missing = tmp_path / "gone.img"
    settings = qemu_settings(qemu)
    check_runnable(domain(), settings, sys_root=sysfs)  # QEMU asked (and its answer kept)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    everything_wrong = domain(
        machine="pc-q35-9.9",
        cpu=cpu("custom", "Zen9"),
        disks=disk_file(missing),
        nics=nic("bridge", "br7"),
    )
    with pytest.raises(ConfigUnsupported, match=r"machine type 'pc-q35-9\.9'"):
        check_runnable(everything_wrong, settings, sys_root=sysfs)
    with pytest.raises(ConfigUnsupported, match="CPU model Zen9"):
        check_runnable(
            domain(cpu=cpu("custom", "Zen9"), disks=disk_file(missing)), settings, sys_root=sysfs
        )
    with pytest.raises(HostResourceMissing, match="Cannot access storage file"):
        check_runnable(
            domain(disks=disk_file(missing), nics=nic("bridge", "br7")), settings, sys_root=sysfs
        )
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert calls(qemu.parent) == ["-machine", "-cpu"]


def test_a_cpuset_must_name_online_cpus(qemu: Path, sysfs: Path) -> None:
    (sysfs / "devices/system/cpu").mkdir(parents=True)
    (sysfs / "devices/system/cpu/online").write_text("0-3,6\n")
    settings = qemu_settings(qemu)

    def pinned(cpuset: str) -> DomainDef:
        return parse_domain(domain().xml.replace("<vcpu>1</vcpu>", f"<vcpu cpuset='{cpuset}'>1</vcpu>"))

    check_runnable(pinned("0-3,^1,6"), settings, sys_root=sysfs)
    refused(
        HostResourceMissing,
        "host CPU 4 named by <vcpu cpuset> is not online on this host (online: 0-3,6)",
        pinned("2-5"),
        settings,
        sys_root=sysfs,
    )
    # simvm is not pinned (it emulates none of the host placement): nothing to check
    check_runnable(pinned("9"), SIMVM, sys_root=sysfs)
