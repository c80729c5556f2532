"""migctl's command line (help, DESTURI forms, errors as virsh prints them), --version on
the four programs, and the daemons' operating pieces that need no daemon: sd_notify over a
real AF_UNIX datagram socket, the default config file, the SIGTERM drain."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from vmmigrate.common import errors, sdnotify
from vmmigrate.common.config import default_config_file
from vmmigrate.common.daemon import daemon_main, drain
from vmmigrate.common.shutdown import ShutdownGate
from vmmigrate.common.version import package_version
from vmmigrate.migctl import main as migctl
from vmmigrate.migctl.helptext import command_page, overview
from vmmigrate.migctl.uri import dest_address

BIN = Path(sys.executable).parent


# --- DESTURI ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("hostb", "hostb:7302"),
        ("hostb:9000", "hostb:9000"),
        ("[::1]:9000", "[::1]:9000"),
        ("qemu+tls://hostb/system", "hostb:7302"),
        ("qemu://hostb/system", "hostb:7302"),
        ("qemu+tcp://hostb:7402/system", "hostb:7402"),  # the port is taken as dstd's
        ("qemu+tls://[fd00::2]/system", "[fd00::2]:7302"),
        ("qemu+tls://10.0.0.2:7302/system/", "10.0.0.2:7302"),
    ],
)
def test_desturi_forms(uri: str, address: str) -> None:
    assert dest_address(uri) == address


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("qemu+ssh://root@hostb/system", "transport 'ssh' is not supported"),
        ("qemu+unix:///system", "transport 'unix' is not supported"),
        ("qemu+ext://hostb/system", "transport 'ext' is not supported"),
        ("xen://hostb/", "only the qemu driver"),
        ("qemu:///system", "names no host"),
        ("qemu+tls://hostb/session", "only the system instance"),
        ("qemu+tls://hostb/system?no_verify=1", "URI parameters are not supported"),
        ("qemu+tcp://hostb:99999/system", "invalid port"),
    ],
)
def test_desturi_refused(uri: str, words: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        dest_address(uri)
    assert words in str(info.value)


# --- help --------------------------------------------------------------------------------

def _commands() -> dict[str, argparse.ArgumentParser]:
    for action in migctl._build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_top_help_lists_every_command() -> None:
    text = migctl._build_parser().format_help()
    for name in _commands():
        assert f"    {name}" in text, name


def test_every_option_has_a_help_line() -> None:
    for name, sub in _commands().items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}"


def test_migrate_help_describes_all_options() -> None:
    sub = _commands()["migrate"]
    text = sub.format_help()
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 19  # the 21 of the issue count the two operands
    for action in options:
        assert action.help and action.help in " ".join(text.split()), action.dest


def test_help_overview_groups_every_command() -> None:
    text = overview(migctl._build_parser())
    assert text.startswith("Grouped commands:\n")
    assert " Domain Management (help keyword 'domain'):" in text
    assert " Domain Monitoring (help keyword 'monitor'):" in text
    for name in _commands():
        assert f"    {name} " in text, name


def test_help_command_page_layout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        migctl.main(["help", "migrate"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("  ") and line.isupper()]
    assert heads == ["  NAME", "  SYNOPSIS", "  DESCRIPTION", "  OPTIONS"]
    assert "    migrate - migrate a domain to another host" in out
    assert "<domain> <desturi>" in out
    assert "    --bandwidth <number>" in out and "    --live " in out


def test_help_group_keyword_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    text = command_page(migctl._build_parser(), "monitor")
    assert "Domain Monitoring" in text and "Domain Management" not in text
    with pytest.raises(SystemExit) as info:
        migctl.main(["help", "no-such"])
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: command or command group 'no-such' doesn't exist\n"


# --- errors as virsh prints them ---------------------------------------------------------

def _ns(command: str, **kw: str) -> argparse.Namespace:
    return argparse.Namespace(command=command, **kw)


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        (errors.OperationInvalid, "Requested operation is not valid: "),
        (errors.OperationFailed, "operation failed: "),
        (errors.InvalidArgument, "invalid argument: "),
        (errors.UnsupportedFlags, "invalid argument: "),
        (errors.XMLError, "XML error: "),
        (errors.ArgumentUnsupported, "argument unsupported: "),
        (errors.NoDomain, "Domain not found: "),
        (errors.OperationAborted, "operation aborted: "),
        (errors.Timeout, "Timed out during operation: "),
        (errors.Unauthenticated, "authentication failed: "),
        (errors.PeerUnavailable, ""),
        (errors.ShuttingDown, ""),
    ],
)
def test_category_per_class(cls: type[errors.VmmigrateError], prefix: str) -> None:
    assert errors.libvirt_text(cls("some text")) == prefix + "some text"


def test_category_by_name_covers_classes_added_elsewhere() -> None:
    class PermissionDenied(errors.VmmigrateError):
        pass

    assert errors.libvirt_text(PermissionDenied("x")) == "operation forbidden: x"


def test_prefix_never_doubled() -> None:
    text = "Domain not found: no domain with matching name 'x'"
    assert errors.libvirt_text(errors.NoDomain(text)) == text
    crash = errors.OperationFailed("internal error: KeyError: 'x'")
    assert errors.libvirt_text(crash) == "internal error: KeyError: 'x'"


def test_error_lines_per_command() -> None:
    exc = errors.OperationInvalid("domain is not running")
    assert migctl.error_lines(_ns("migrate", domain="vm1"), exc) == [
        "error: Failed to migrate domain 'vm1'",
        "error: Requested operation is not valid: domain is not running",
    ]
    assert migctl.error_lines(_ns("suspend", domain="vm1"), exc)[0] == (
        "error: Failed to suspend domain 'vm1'"
    )
    assert migctl.error_lines(_ns("define", file="a.xml"), errors.XMLError("bad"))[0] == (
        "error: Failed to define domain from a.xml"
    )
    missing = errors.NoDomain("no domain with matching name 'vm9'")
    assert migctl.error_lines(_ns("start", domain="vm9"), missing) == [
        "error: failed to get domain 'vm9'",
        "error: Domain not found: no domain with matching name 'vm9'",
    ]
    # no first line where virsh has none
    assert migctl.error_lines(_ns("domjobabort", domain="vm1"), exc) == [
        "error: Requested operation is not valid: domain is not running"
    ]
    unreadable = migctl.LocalFileError("Failed to open file 'x': gone")
    assert migctl.error_lines(_ns("define", file="x"), unreadable) == [
        "error: Failed to open file 'x': gone"
    ]


def test_unreachable_srcd_reads_as_virsh(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as info:
        migctl.main(["-c", f"127.0.0.1:{port}", "domstate", "vm1"])
    assert info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: failed to connect to the hypervisor"
    assert lines[1].startswith(f"error: unable to connect to daemon '127.0.0.1:{port}'")


def test_ssh_desturi_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        migctl.main(["-c", "127.0.0.1:1", "migrate", "--p2p", "vm1", "qemu+ssh://b/system"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: Failed to migrate domain 'vm1'"
    assert err[1].startswith("error: invalid argument: destination URI 'qemu+ssh://b/system'")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--offline", "--timeout", "5"], "migrate: Unexpected timeout for offline migration"),
        (["--timeout", "5"], "migrate: Unexpected timeout for offline migration"),  # not --live
        (["--live", "--timeout", "0"], "migrate: Invalid timeout"),
        (["--live", "--timeout-suspend"], "migrate: Unexpected --timeout-* option without --timeout"),
        (["--live", "--bandwidth", "-1"], "migrate: Invalid bandwidth"),
    ],
)
def test_migrate_timeout_and_bandwidth_rules(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """virsh's rules for --timeout, --timeout-* and --bandwidth (evacuate's share them:
    tests/unit/test_evacuate.py), refused before any call."""
    with pytest.raises(SystemExit) as info:
        migctl.main(["-c", "127.0.0.1:1", "migrate", *argv, "vm1", "hostb"])
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"


# --- --version -----------------------------------------------------------------------------

@pytest.mark.parametrize("prog", ["migctl", "srcd", "dstd", "simvm"])
def test_version(prog: str) -> None:
    r = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{prog} {package_version()}\n"
    assert package_version()[0].isdigit()


# --- sd_notify -----------------------------------------------------------------------------

def test_notify_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(5)
        assert sdnotify.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": path})
        assert rx.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_to_an_abstract_socket() -> None:
    name = f"vmmigrate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(b"\0" + name.encode())
        rx.settimeout(5)
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert rx.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_or_listener(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


# --- default config file -------------------------------------------------------------------

def test_default_config_file(tmp_path: Path) -> None:
    assert default_config_file(tmp_path / "srcd.toml") is None  # missing: fine
    (tmp_path / "srcd.toml").write_text("")
    assert default_config_file(tmp_path / "srcd.toml") == tmp_path / "srcd.toml"


def _daemon(config_dir: Path, *argv: str) -> int:
    def never(_: object) -> object:
        raise AssertionError("must not serve")

    return daemon_main(
        "srcd",
        description="test",
        default_port=7301,
        server_factory=never,  # type: ignore[arg-type]
        failpoint_names=(),
        argv=list(argv),
        config_dir=config_dir,
    )


def test_invalid_default_config_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "srcd.toml").write_text("listen = \n")
    assert _daemon(tmp_path, "--state-dir", str(tmp_path)) == 2
    assert f"config file {tmp_path / 'srcd.toml'}" in capsys.readouterr().err


def test_unreadable_default_config_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # unreadable even for root (a file of mode 0 is not): a directory where the file belongs
    (tmp_path / "srcd.toml").mkdir()
    assert _daemon(tmp_path, "--state-dir", str(tmp_path)) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_explicit_config_wins_over_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "srcd.toml").write_text("broken = [\n")
    other = tmp_path / "other.toml"
    other.write_text("unknown_key = 1\n")
    assert _daemon(tmp_path, "--config", str(other), "--state-dir", str(tmp_path)) == 2
    assert "unknown setting 'unknown_key'" in capsys.readouterr().err


# --- SIGTERM drain -------------------------------------------------------------------------

class _Ctx:
    def __init__(self, in_flight: int) -> None:
        self.gate = ShutdownGate()
        self.in_flight = in_flight

    def migrations_in_flight(self) -> int:
        return self.in_flight


def test_drain_waits_for_migrations_in_flight() -> None:
    async def scenario() -> float:
        ctx = _Ctx(1)
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, setattr, ctx, "in_flight", 0)
        start = loop.time()
        await drain(ctx, 10.0, asyncio.Event(), structlog.get_logger())
        assert ctx.gate.closed
        return loop.time() - start

    assert 0.25 <= asyncio.run(scenario()) < 5


def test_drain_gives_up_after_the_grace_period() -> None:
    async def scenario() -> float:
        ctx = _Ctx(1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await drain(ctx, 0.3, asyncio.Event(), structlog.get_logger())
        return loop.time() - start

    assert 0.25 <= asyncio.run(scenario()) < 5


# --- contrib -------------------------------------------------------------------------------

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


@pytest.mark.parametrize("prog", ["srcd", "dstd"])
def test_example_config_loads_and_documents_every_key(prog: str) -> None:
    import dataclasses

    from vmmigrate.common.config import DaemonConfig, load_config

    path = CONTRIB / f"{prog}.toml"
    config = load_config(argparse.Namespace(), default_port=7301, config_file=path)
    assert str(config.state_dir) == "/var/lib/vmmigrate"
    text = path.read_text()
    # every setting, but the tests' own failpoints and the other daemon's own ones
    dst_only = {"max_incoming", "migration_address", "migration_ports", "storage_dirs"}
    skip = {"failpoints", "failpoint_seed"} | (dst_only if prog == "srcd" else {"max_outgoing"})
    for field in dataclasses.fields(DaemonConfig):
        if field.name not in skip:
            assert f"{field.name} = " in text, field.name


@pytest.mark.parametrize("prog", ["srcd", "dstd"])
def test_systemd_unit(prog: str) -> None:
    text = (CONTRIB / "systemd" / f"{prog}.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "KillMode=process",
                 f"ExecStart=/usr/local/bin/{prog} --config /etc/vmmigrate/{prog}.toml"):
        assert f"\n{line}\n" in text, line
