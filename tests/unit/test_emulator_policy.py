"""The emulator policy: config keys, the default allowlist, the definition check."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc
import pytest
from vmmigrate.common.config import DaemonConfig, add_common_options, load_config
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import ConfigUnsupported, InvalidArgument, error_from_status
from vmmigrate.common.hypervisor import (
    EmulatorPolicy,
    check_definition,
    default_emulators,
    emulator_kind,
    has_qemu_commandline,
    policy_from_config,
)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _config(tmp_path: Path, toml: str, *argv: str) -> DaemonConfig:
    ap = argparse.ArgumentParser()
    add_common_options(ap)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n' + toml)
    return load_config(ap.parse_args(list(argv)), default_port=7301, config_file=cfg)


def _domain(emulator: str = "", commandline: bool = False) -> DomainDef:
    devices = f"<devices><emulator>{emulator}</emulator></devices>" if emulator else ""
    extra = ("<qemu:commandline><qemu:arg value='-S'/></qemu:commandline>"
             if commandline else "")
    return parse_domain(f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'><name>vm</name>"
                        f"<memory>1024</memory>{devices}{extra}</domain>")


def test_config_keys(tmp_path: Path) -> None:
    c = _config(tmp_path, 'emulators = ["simvm", "/usr/bin/qemu-system-x86_64"]\n'
                          'emulator_user = "nobody"\nemulator-group = 65534\n')
    assert c.emulators == ("simvm", "/usr/bin/qemu-system-x86_64")
    assert c.allow_qemu_commandline is False
    assert (c.emulator_user, c.emulator_group) == ("nobody", "65534")
    assert _config(tmp_path, "", "--allow-qemu-commandline").allow_qemu_commandline is True
    assert _config(tmp_path, "allow_qemu_commandline = true\n").allow_qemu_commandline
    assert _config(tmp_path, "").emulators is None  # the default: found at start


@pytest.mark.parametrize("toml", ['emulators = ["qemu-system-x86_64"]\n',
                                  'emulators = "/usr/bin/qemu"\n',
                                  'allow_qemu_commandline = "yes"\n',
                                  'emulator_user = ""\n'])
def test_config_keys_refused(tmp_path: Path, toml: str) -> None:
    with pytest.raises(InvalidArgument):
        _config(tmp_path, toml)


def test_default_allowlist_is_simvm_and_qemu_system_in_path(tmp_path: Path) -> None:
    bins = tmp_path / "bin"
    bins.mkdir()
    for name, mode in (("qemu-system-x86_64", 0o755), ("qemu-system-arm", 0o644),
                       ("qemu-img", 0o755), ("sh", 0o755)):
        (bins / name).write_text("")
        os.chmod(bins / name, mode)
    found = default_emulators(f"{bins}{os.pathsep}relative{os.pathsep}")
    assert "simvm" in found
    assert str(bins / "qemu-system-x86_64") in found
    assert not {str(bins / n) for n in ("qemu-system-arm", "qemu-img", "sh")} & set(found)


def test_check_definition() -> None:
    strict = EmulatorPolicy(allowed=frozenset({"simvm", "/usr/bin/qemu-system-x86_64"}))
    for ok in ("", "simvm", "/usr/bin/qemu-system-x86_64", "/usr/bin/./qemu-system-x86_64"):
        check_definition(_domain(ok), strict)
    for bad in ("/bin/sh", "qemu-system-x86_64", "/tmp/simvm", "/usr/bin/../bin/sh"):
        with pytest.raises(ConfigUnsupported, match=f"emulator '{bad}' is not allowed"):
            check_definition(_domain(bad), strict)
    d = _domain(commandline=True)
    assert has_qemu_commandline(d) and not has_qemu_commandline(_domain())
    with pytest.raises(ConfigUnsupported, match="<qemu:commandline> is not allowed"):
        check_definition(d, strict)
    check_definition(d, EmulatorPolicy(allow_qemu_commandline=True))


def test_kind_and_error_class(tmp_path: Path) -> None:
    assert emulator_kind(_domain("simvm"), "qemu") == "simvm"
    assert emulator_kind(_domain("/opt/x/simvm"), "qemu") == "simvm"
    assert emulator_kind(_domain("/usr/bin/qemu-kvm"), "simvm") == "qemu"
    assert emulator_kind(_domain(), "qemu") == "qemu"
    assert ConfigUnsupported.code == grpc.StatusCode.FAILED_PRECONDITION
    err = error_from_status(ConfigUnsupported.code, "x", "ConfigUnsupported")
    assert isinstance(err, ConfigUnsupported)
    policy = policy_from_config(_config(tmp_path, 'emulators = ["/a/../b/qemu"]\n'), "")
    assert policy.allowed == frozenset({"/b/qemu"}) and policy.uid is None


def test_unknown_emulator_user_refused_at_start(tmp_path: Path) -> None:
    c = _config(tmp_path, 'emulator_user = "no-such-user-vmmtest"\n')
    with pytest.raises(InvalidArgument, match="no such user"):
        policy_from_config(c, "")


def test_the_emulator_is_confined_to_the_cpuset(tmp_path: Path) -> None:
    """<vcpu cpuset>: taskset sets the CPUs and execs the emulator, which (and every thread
    it starts) inherits them; without a cpuset nothing is changed."""
    from vmmigrate.common.hypervisor import _spawn

    show = ["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"]
    for cpus, expect in ((frozenset({0}), "0"), (None, _allowed_list())):
        log = tmp_path / f"log{expect}"
        proc = _spawn(show, str(log), EmulatorPolicy(), cpus)
        assert proc.wait(timeout=20) == 0
        assert log.read_text().split() == ["Cpus_allowed_list:", expect]


def _allowed_list() -> str:
    status = Path("/proc/self/status").read_text()
    return next(line.split()[1] for line in status.splitlines()
                if line.startswith("Cpus_allowed_list:"))
