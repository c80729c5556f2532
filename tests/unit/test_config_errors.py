"""Typed config (TOML + command line), the error tree and its gRPC mapping, failpoints."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import pytest
from vmmigrate.common import errors
from vmmigrate.common.config import add_common_options, load_config, parse_hostport
from vmmigrate.common.failpoints import ALL_FAILPOINTS, Failpoints
from vmmigrate.common.rpc import status_of


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_common_options(ap)
    return ap.parse_args(list(argv))


def test_config_file_and_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "srcd.toml"
    cfg.write_text('listen = "127.0.0.2:9000"\nstate_dir = "/tmp/x"\nrpc_timeout = 5\n'
                   'host-uuid = "8B3F4DC4-6A8E-5F9B-94A5-4C35BABD8D95"\n')
    c = load_config(_args("--listen", "127.0.0.3:9001"), default_port=7301, config_file=cfg)
    assert c.listen == "127.0.0.3:9001"  # the command line wins
    assert c.state_dir == Path("/tmp/x") and c.rpc_timeout == 5.0
    assert c.host_uuid == "8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95"


@pytest.mark.parametrize(
    ("toml", "message"),
    [('bogus = 1\nstate_dir = "/x"\n', "unknown setting 'bogus'"),
     ('state_dir = "/x"\nhost_uuid = "nope"\n', "host_uuid 'nope' is not a UUID"),
     ('state_dir = "/x"\nmigration_ports = "9-1"\n', "out of 1-65535 or reversed"),
     ('state_dir = "/x"\nrpc_timeout = 0\n', "rpc_timeout must be positive"),
     ('state_dir = "/x"\ndowntime_limit_ms = 0\n', "downtime_limit_ms must be 1 to 2000000 ms"),
     ('state_dir = "/x"\ndowntime_limit_ms = 2.5\n', "downtime_limit_ms must be a whole number"),
     ('state_dir = "/x"\ndowntime_limit_max_ms = true\n', "must be a whole number"),
     ('state_dir = "/x"\ndowntime_limit_ms = 50\ndowntime_limit_max_ms = 40\n',
      r"downtime_limit_max_ms \(40\) is below downtime_limit_ms \(50\)"),
     ("state_dir = [\n", "config file")],
)
def test_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(errors.InvalidArgument, match=message):
        load_config(_args(), default_port=7301, config_file=cfg)


def test_state_dir_required() -> None:
    with pytest.raises(errors.InvalidArgument, match="--state-dir is required"):
        load_config(_args(), default_port=7301, config_file=None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.2:7302", ("127.0.0.2", 7302)), ("[::1]:7302", ("::1", 7302)),
     ("hostb", ("hostb", 7302)), ("[::1]", ("::1", 7302))],
)
def test_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, 7302) == expected


def test_hostport_errors() -> None:
    with pytest.raises(errors.InvalidArgument):
        parse_hostport("host:notaport", 7302)
    with pytest.raises(errors.InvalidArgument):
        parse_hostport("host", None)


def test_every_error_class_round_trips_through_a_status() -> None:
    todo: list[type[errors.VmmigrateError]] = [errors.VmmigrateError]
    seen = 0
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ != "vmmigrate.common.errors":
            continue
        code, message, metadata = status_of(cls("boom"))
        assert code == cls.code and message == "boom"
        back = errors.error_from_status(code, message, dict(metadata)[errors.ERROR_CLASS_KEY])
        assert type(back) is cls and str(back) == "boom"
        seen += 1
    assert seen >= 18


def test_unknown_error_class_falls_back_on_the_code() -> None:
    e = errors.error_from_status(grpc.StatusCode.ALREADY_EXISTS, "dup", "SomethingNew")
    assert isinstance(e, errors.DomainExists)
    e = errors.error_from_status(grpc.StatusCode.UNAVAILABLE, "down", None)
    assert isinstance(e, errors.PeerUnavailable)
    code, message, _ = status_of(ValueError("bug"))
    assert code == grpc.StatusCode.INTERNAL and message == "internal error: ValueError: bug"


def test_failpoints_parse_and_act() -> None:
    fp = Failpoints.parse("dstd.finish.before=error; srcd.confirm.before=delay(5)")
    assert fp
    with pytest.raises(errors.OperationFailed, match=r"failpoint dstd\.finish\.before injected"):
        asyncio.run(fp.hit("dstd.finish.before"))
    asyncio.run(fp.hit("srcd.confirm.before"))
    asyncio.run(fp.hit("srcd.prepare.before"))  # unarmed: nothing happens
    assert not Failpoints.parse("")
    with pytest.raises(errors.InvalidArgument, match="unknown failpoint 'nope'"):
        Failpoints.parse("nope=crash")
    with pytest.raises(errors.InvalidArgument, match="unknown action 'explode'"):
        Failpoints.parse("dstd.finish.before=explode")
    assert len(ALL_FAILPOINTS) >= 15


def test_failpoints_fire_at_random_with_a_percentage() -> None:
    """ACTION@PCT fires on about PCT percent of hits, repeatably for one seed."""

    def fired(seed: str) -> list[bool]:
        fp = Failpoints.parse("dstd.finish.before=error@25", seed)
        out = []
        for _ in range(2000):
            try:
                asyncio.run(fp.hit("dstd.finish.before"))
                out.append(False)
            except errors.OperationFailed:
                out.append(True)
        return out

    first = fired("7")
    assert 400 < sum(first) < 600
    assert fired("7") == first
    with pytest.raises(errors.InvalidArgument, match="percent must be in"):
        Failpoints.parse("dstd.finish.before=crash@0")
    with pytest.raises(errors.InvalidArgument, match="unknown action"):
        Failpoints.parse("dstd.finish.before=crash@x")


def test_foreign_subclass_names_fall_back_on_the_code() -> None:
    """QMPExecuteError takes other arguments: a peer naming it gets the code's class."""
    e = errors.error_from_status(grpc.StatusCode.INTERNAL, "GenericError: x", "QMPExecuteError")
    assert type(e) is errors.OperationFailed and str(e) == "GenericError: x"


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("tcp:127.0.0.3:49152", True),
        ("tcp:[::1]:49152", True),
        ("tcp:hostb.example:49153", True),
        ("exec:cat /etc/shadow", False),
        ("file:/tmp/x", False),
        ("unix:/run/x.sock", False),
        ("rdma:host:1", False),
        ("tcp:host:0", False),
        ("tcp:a b:1", False),
        ("tcp:host", False),
        ("127.0.0.1:1", False),
    ],
)
def test_migration_uri_from_a_client(uri: str, ok: bool) -> None:
    from vmmigrate.common.address import check_migration_uri

    if ok:
        assert check_migration_uri(uri) == uri
    else:
        with pytest.raises((errors.ArgumentUnsupported, errors.InvalidArgument)):
            check_migration_uri(uri)
