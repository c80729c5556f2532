"""A definition runs nothing the host did not allow: <emulator> outside the host's allowlist
and <qemu:commandline> without allow_qemu_commandline are refused at define, at start and
at Prepare, with nothing started and nothing changed on either host; a domain started with
<qemu:commandline> where it is allowed is marked tainted; emulators run as emulator_user.

Host A is permissive (an extra emulator path in its allowlist, <qemu:commandline> allowed),
host B keeps the defaults, so a definition A accepts reaches B's Prepare."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.hosts import Host, sample_domain_xml, settled
from helpers.live import alive, checksum, runs_on_exactly_one
from helpers.qmp import runtime_record

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# allowed on A only: defining it there runs nothing (a definition is not a start)
FOREIGN_EMULATOR = "/opt/vmmtest/bin/qemu-system-x86_64"
COMMANDLINE_REFUSED = "<qemu:commandline> is not allowed on this host (allow_qemu_commandline)"


def _with_devices(xml: str, devices: str = "", tail: str = "") -> str:
    """``sample_domain_xml`` with ``devices`` added in <devices> and ``tail`` after it."""
    xml = xml.replace("<domain type='kvm'>", f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'>")
    xml = xml.replace("</devices>", f"  {devices}\n  </devices>{tail}")
    return xml


def emulator_xml(name: str, u: str, emulator: str) -> str:
    return _with_devices(sample_domain_xml(name, u, memory_mib=32),
                         devices=f"<emulator>{emulator}</emulator>")


def commandline_xml(name: str, u: str) -> str:
    # simvm takes no QEMU arguments: it ignores them, but the domain is tainted all the same
    tail = "\n  <qemu:commandline>\n    <qemu:arg value='-no-reboot'/>\n  </qemu:commandline>"
    return _with_devices(sample_domain_xml(name, u, memory_mib=32), tail=tail)


def snapshot(h: Host) -> dict[str, object]:
    """What a refusal must leave as it was: definitions (bytes), journal, running emulators."""
    run = h.state_dir / "run"
    return {
        "names": sorted(h.names()),
        "domains": {p.name: p.read_bytes() for p in h.domain_files()},
        "journal": [p.name for p in h.journal()],
        "running": sorted(p.name for p in run.glob("*.json")) if run.exists() else [],
    }


@pytest.fixture(scope="module")
def policy_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    base = tmp_path_factory.mktemp("policy")
    permissive = base / "a.toml"
    allowed = ["simvm", FOREIGN_EMULATOR]
    permissive.write_text(f"emulators = {json.dumps(allowed)}\nallow_qemu_commandline = true\n")
    a = Host("A", "127.0.0.2", base / "A")
    b = Host("B", "127.0.0.3", base / "B")
    try:
        a.start(["--config", str(permissive)], ["--config", str(permissive)])
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("emulator", [FOREIGN_EMULATOR, "/bin/sh", "qemu-system-x86_64",
                                      "/tmp/simvm-evil", "/usr/bin/../bin/sh"])
def test_define_refuses_emulator_outside_allowlist(policy_hosts: tuple[Host, Host],
                                                   domname: str, emulator: str) -> None:
    _, b = policy_hosts
    before = snapshot(b)
    path = b.workdir / f"{domname}.xml"
    path.write_text(emulator_xml(domname, str(uuidlib.uuid4()), emulator))
    r = b.migctl("define", str(path), check=False)
    assert r.returncode == 1
    assert f"emulator '{emulator}' is not allowed on this host" in r.stderr, r.stderr
    assert snapshot(b) == before


def test_define_refuses_qemu_commandline(policy_hosts: tuple[Host, Host], domname: str) -> None:
    _, b = policy_hosts
    before = snapshot(b)
    path = b.workdir / f"{domname}.xml"
    path.write_text(commandline_xml(domname, str(uuidlib.uuid4())))
    r = b.migctl("define", str(path), check=False)
    assert r.returncode == 1
    assert COMMANDLINE_REFUSED in r.stderr, r.stderr
    assert snapshot(b) == before


def test_default_allowlist_takes_simvm_and_qemu_in_path(policy_hosts: tuple[Host, Host],
                                                       domname: str) -> None:
    _, b = policy_hosts
    emulators = ["simvm"]
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is not None:
        emulators.append(qemu)
    for i, emulator in enumerate(emulators):
        name = f"{domname}-{i}"
        b.define(emulator_xml(name, str(uuidlib.uuid4()), emulator), f"{name}.xml")
        assert name in b.names()
        b.migctl("undefine", name)
    # the built-in emulator by name: it starts (the daemon's own simvm, never a path)
    u = str(uuidlib.uuid4())
    b.define(emulator_xml(domname, u, "simvm"), f"{domname}.xml")
    b.migctl("start", domname)
    rec = runtime_record(b.state_dir, u)
    assert rec is not None and rec["emulator"] == "simvm"
    assert rec["argv"][:3] == [sys.executable, "-m", "vmmigrate.simvm"]
    b.migctl("destroy", domname)
    b.migctl("undefine", domname)


@pytest.mark.parametrize("mode", [["--p2p"], []], ids=["p2p", "managed"])
def test_prepare_refuses_emulator_outside_allowlist(policy_hosts: tuple[Host, Host],
                                                    domname: str, mode: list[str]) -> None:
    a, b = policy_hosts
    u = str(uuidlib.uuid4())
    a.define(emulator_xml(domname, u, FOREIGN_EMULATOR), f"{domname}.xml")
    before_a, before_b = snapshot(a), snapshot(b)
    r = a.migctl("migrate", "--offline", "--persistent", *mode, domname, b.dst, check=False)
    assert r.returncode == 1
    assert f"emulator '{FOREIGN_EMULATOR}' is not allowed on this host" in r.stderr, r.stderr
    settled(a, b)
    assert snapshot(a) == before_a
    assert snapshot(b) == before_b
    a.migctl("undefine", domname)


def test_prepare_refuses_commandline_sent_with_xml(policy_hosts: tuple[Host, Host],
                                                   domname: str) -> None:
    """migctl migrate --xml: the source's definition is plain, the one sent is not."""
    a, b = policy_hosts
    u = str(uuidlib.uuid4())
    a.define(sample_domain_xml(domname, u, memory_mib=32), f"{domname}.xml")
    sent = a.workdir / f"{domname}-sent.xml"
    sent.write_text(commandline_xml(domname, u))
    before_a, before_b = snapshot(a), snapshot(b)
    r = a.migctl("migrate", "--offline", "--persistent", "--p2p", "--xml", str(sent),
                 domname, b.dst, check=False)
    assert r.returncode == 1
    assert COMMANDLINE_REFUSED in r.stderr, r.stderr
    settled(a, b)
    assert snapshot(a) == before_a
    assert snapshot(b) == before_b
    a.migctl("undefine", domname)


def test_commandline_taints_and_live_migration_to_strict_host_refused(
        policy_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = policy_hosts
    u = str(uuidlib.uuid4())
    a.define(commandline_xml(domname, u), f"{domname}.xml")
    a.migctl("start", domname)
    rec = runtime_record(a.state_dir, u)
    assert rec is not None
    taint = f"domain '{domname}' (uuid {u}) is tainted: custom-argv"
    assert taint in Path(rec["log"]).read_text()
    assert a.srcd is not None
    tainted = [e for e in a.srcd.events() if e.get("event") == "domain_tainted"]
    assert [(e["domain"], e["taint"], e["level"]) for e in tainted] == [
        (domname, "custom-argv", "warning")]
    before_a, before_b = snapshot(a), snapshot(b)
    r = a.migctl("migrate", "--live", "--p2p", "--persistent", domname, b.dst, check=False)
    assert r.returncode == 1
    assert COMMANDLINE_REFUSED in r.stderr, r.stderr
    settled(a, b)
    assert runs_on_exactly_one(a, b, u) == "A"
    assert a.migctl("domstate", domname).stdout.strip() == "running"
    assert snapshot(a) == before_a
    assert snapshot(b) == before_b
    a.migctl("destroy", domname)
    a.migctl("undefine", domname)


def test_start_refuses_what_the_policy_no_longer_allows(tmp_path: Path, domname: str) -> None:
    """A definition stored under a permissive policy does not start under a strict one."""
    permissive = tmp_path / "permissive.toml"
    permissive.write_text("allow_qemu_commandline = true\n")
    h = Host("A", "127.0.0.2", tmp_path / "A")
    try:
        h.start(["--config", str(permissive)], ["--config", str(permissive)])
        u = str(uuidlib.uuid4())
        h.define(commandline_xml(domname, u), f"{domname}.xml")
        h.start_srcd()  # restarted with the defaults: <qemu:commandline> refused
        r = h.migctl("start", domname, check=False)
        assert r.returncode == 1
        assert COMMANDLINE_REFUSED in r.stderr, r.stderr
        assert runtime_record(h.state_dir, u) is None
        assert h.migctl("domstate", domname).stdout.strip() == "shut off"
    finally:
        h.stop()


# ---------------------------------------------------------------------------------------
# emulators as an unprivileged user

EMU_USER = "vmmtest-emu"


def _status_ids(pid: int) -> tuple[list[int], list[int], str]:
    """(Uid, Gid, Groups) of a process, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ([int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()],
            fields["Groups"])


def _runs_simvm_as(python: str, env: dict[str, str], uid: int, gid: int) -> bool:
    try:
        r = subprocess.run([python, "-c", "import vmmigrate.simvm.main"], user=uid, group=gid,
                           extra_groups=[], cwd="/", env=env, capture_output=True, timeout=60)
    except OSError:  # the interpreter itself is out of reach
        return False
    return r.returncode == 0


def _interpreter_for(uid: int, gid: int) -> tuple[str, dict[str, str]]:
    """An interpreter (and environment) with which ``uid`` can run simvm from this checkout.

    The daemons' simvm runs with their own interpreter: ours, unless it lives where the
    emulator user cannot read (a pyenv under a mode-0700 /root); then the system's Python of
    the same version, given our packages through PYTHONPATH (all of it under the checkout)."""
    env = dict(os.environ)
    if _runs_simvm_as(sys.executable, env, uid, gid):
        return sys.executable, {}
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                          path="/usr/local/bin:/usr/bin:/bin")
    import vmmigrate.simvm

    package_root = Path(vmmigrate.simvm.__file__).parents[2]  # the editable install's root
    site = [p for p in sys.path if p.endswith("site-packages")]
    extra = {"PYTHONPATH": os.pathsep.join([str(package_root), *site])}
    if system is None or not _runs_simvm_as(system, {**env, **extra}, uid, gid):
        pytest.skip(f"{EMU_USER} cannot run simvm: neither {sys.executable} nor a system "
                    f"python{sys.version_info.major}.{sys.version_info.minor} can read it")
    return system, extra


@pytest.fixture
def emu_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("emulators as another user need root (the test creates that user)")
    if shutil.which("useradd") is None:
        pytest.skip("useradd not installed (passwd)")
    with contextlib.suppress(KeyError):
        pwd.getpwnam(EMU_USER)
        subprocess.run(["userdel", EMU_USER], check=False)  # left over by an aborted run
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", EMU_USER], check=True)
    try:
        yield pwd.getpwnam(EMU_USER)
    finally:
        subprocess.run(["userdel", EMU_USER], check=False)


def test_emulator_runs_as_emulator_user(emu_user: pwd.struct_passwd, tmp_path: Path,
                                        domname: str) -> None:
    uid, gid = emu_user.pw_uid, emu_user.pw_gid
    python, env = _interpreter_for(uid, gid)
    config = tmp_path / "emu.toml"
    config.write_text(f'emulator_user = "{EMU_USER}"\n')
    args = ["--config", str(config)]
    a = Host("A", "127.0.0.2", tmp_path / "A", python=python)
    b = Host("B", "127.0.0.3", tmp_path / "B", python=python)
    try:
        a.start(args, args, env=env)
        b.start(args, args, env=env)
        u = str(uuidlib.uuid4())
        a.define(sample_domain_xml(domname, u, memory_mib=32), f"{domname}.xml")
        a.migctl("start", domname)
        rec = runtime_record(a.state_dir, u)
        assert rec is not None
        uids, gids, groups = _status_ids(rec["pid"])
        assert uids == [uid] * 4 and gids == [gid] * 4 and groups in ("", str(gid)), (
            uids, gids, groups)
        # its monitor sits in a directory of the emulator's group, not in the state dir
        socket_dir = Path(rec["qmp"]).parent
        st = socket_dir.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o770)
        assert Path(rec["log"]).stat().st_uid == 0  # the daemon's, handed over as a fd
        a.migctl("migrate", "--live", "--p2p", "--persistent", "--undefinesource",
                 domname, b.dst, timeout=120)
        assert runs_on_exactly_one(a, b, u) == "B"
        rec_b = runtime_record(b.state_dir, u)
        assert rec_b is not None
        assert _status_ids(rec_b["pid"])[0] == [uid] * 4
        sums = checksum(b, u)  # the memory arrived whole
        assert sums["source-sha256"] == sums["sha256"]
        assert b.migctl("domstate", domname).stdout.strip() == "running"
        b.migctl("destroy", domname)
        assert not alive(rec_b["pid"])
        assert b.migctl("domstate", domname).stdout.strip() == "shut off"
    finally:
        a.stop()
        b.stop()
