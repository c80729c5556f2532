"""Typed daemon configuration: loaded once (TOML file, then command-line overrides), passed in.

Nothing here runs at import time; :func:`load_config` is called by each daemon's main().
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

# re-exported: the daemons name them from here; migctl imports common.address alone
from vmmigrate.common.address import DEFAULT_DSTD_PORT as DEFAULT_DSTD_PORT  # noqa: PLC0414
from vmmigrate.common.address import DEFAULT_SRCD_PORT as DEFAULT_SRCD_PORT  # noqa: PLC0414
from vmmigrate.common.address import format_hostport as format_hostport  # noqa: PLC0414
from vmmigrate.common.address import parse_hostport as parse_hostport  # noqa: PLC0414
from vmmigrate.common.errors import InvalidArgument
from vmmigrate.common.uuids import canonical_uuid_or_none


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """Settings of one srcd or dstd process."""

    listen: str
    state_dir: Path
    host_uuid: str | None = None
    hostname: str | None = None
    migration_address: str | None = None
    migration_ports: tuple[int, int] = (49152, 49215)
    # Deadline of one RPC to a peer daemon (connect included), seconds.
    rpc_timeout: float = 30.0
    # Deadline of a whole migration driven by this daemon, seconds.
    migration_timeout: float = 600.0
    # Largest gRPC message either daemon accepts or sends, bytes.
    max_message_bytes: int = 16 * 1024 * 1024
    # Largest domain XML accepted, bytes.
    max_xml_bytes: int = 4 * 1024 * 1024
    # How long a client-driven migration may sit between two of its phase RPCs, seconds.
    job_idle_timeout: float = 300.0
    # Emulator for domains whose XML names none: "simvm" (built in) or "qemu".
    emulator: str = "simvm"
    qemu_binary: str = "qemu-system-x86_64"
    qemu_accel: str = "tcg"
    # What a definition may make this host run: the emulators its <emulator> may name
    # (absolute paths, or "simvm" for the built-in one; None: simvm and the qemu-system-*
    # binaries in PATH when the daemon starts), whether <qemu:commandline> arguments are
    # accepted, and the user and group emulators run as (None: the daemon's own).
    emulators: tuple[str, ...] | None = None
    allow_qemu_commandline: bool = False
    emulator_user: str | None = None
    emulator_group: str | None = None
    # QEMU guests: the host bridge of each network an <interface type='network'> may name
    # (``networks = { default = "virbr0" }``), and where autoport VNC displays are picked.
    networks: dict[str, str] = dataclasses.field(default_factory=dict)
    vnc_ports: tuple[int, int] = (5900, 65535)
    # Storage copy (dstd, --copy-storage-all/-inc): the directories where incoming disks
    # may be created and written (absolute paths). A copied disk elsewhere is refused at
    # Prepare; none (the default): every storage copy into this host is refused.
    storage_dirs: tuple[str, ...] = ()
    # Host limits: migrations this host runs at once as destination (dstd) and as source
    # (srcd). A busy destination answers RESOURCE_EXHAUSTED (the source retries with backoff
    # until its deadline); a busy source queues a migration until a slot frees or its
    # deadline passes. 0 = no limit.
    max_incoming: int = 64
    max_outgoing: int = 64
    # How long a destination remembers how a migration ended (for a source that asks again
    # after a lost answer or a restart), seconds.
    outcome_ttl: float = 24 * 3600.0
    # Poll interval of a running migration's statistics, seconds.
    migration_poll_interval: float = 0.02
    # Live migration's switch-over (srcd/switchover.py): the downtime limit the source
    # emulator starts with and never goes below (ms), and the most it escalates to when
    # the guest does not converge (ms; QEMU's own default). migrate-setmaxdowntime
    # overrides both for a domain.
    downtime_limit_ms: int = 20
    downtime_limit_max_ms: int = 300
    # Armed failpoints (tests only), from $VMMIGRATE_FAILPOINTS, read by main().
    failpoints: str = ""
    failpoint_seed: str = ""  # from $VMMIGRATE_FAILPOINT_SEED: repeatable random faults
    # SIGTERM: how long the migrations in flight may take to finish before the daemon exits
    # anyway (leaving them to recovery at the next start), seconds. New ones are refused.
    shutdown_grace: float = 30.0
    # Prometheus metrics: HOST:PORT to serve /metrics on (port 0 picks one); off if unset.
    metrics_listen: str | None = None
    # Finished migrations kept in the host's history (the oldest are pruned).
    history_limit: int = 1000
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    # Mutual TLS: the directory with ca.pem, cert.pem, key.pem (``migctl pki issue``);
    # None: /etc/vmmigrate/pki when it exists. ``insecure``: plaintext on any address
    # (without it, plaintext is for loopback only; common/tls.py).
    tls_dir: Path | None = None
    insecure: bool = False


_FIELDS = {f.name: f for f in dataclasses.fields(DaemonConfig)}


def _parse_ports(text: str) -> tuple[int, int]:
    try:
        lo_s, hi_s = text.split("-", 1)
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise InvalidArgument(f"migration ports must be MIN-MAX, got {text!r}") from None
    if not (1 <= lo <= hi <= 65535):
        raise InvalidArgument(f"migration port range {text!r} is out of 1-65535 or reversed")
    return lo, hi


_EMULATOR_KEYS = ("emulators", "allow_qemu_commandline", "emulator_user", "emulator_group")


def _coerce_emulator_key(name: str, value: Any) -> Any:
    if name == "emulators":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument("emulators must be a list of paths")
        for path in value:
            # a relative name would be looked up in PATH at each start: not one binary
            if path != "simvm" and not path.startswith("/"):
                raise InvalidArgument(f"emulators: '{path}' is not an absolute path or 'simvm'")
        return tuple(value)
    if name == "allow_qemu_commandline":
        if not isinstance(value, bool):
            raise InvalidArgument("allow_qemu_commandline must be true or false")
        return value
    if value is not None and (not isinstance(value, (str, int)) or str(value) == ""):
        raise InvalidArgument(f"{name} must be a user or group name or number")
    return None if value is None else str(value)


# Durations, seconds: all positive, but for shutdown_grace, which may be 0 (stop at once).
_SECONDS = (
    "rpc_timeout",
    "migration_timeout",
    "job_idle_timeout",
    "migration_poll_interval",
    "outcome_ttl",
    "shutdown_grace",
)


# QEMU's downtime-limit range: 0 to 2000 s (in ms)
_DOWNTIME_MAX_MS = 2_000_000


def _downtime_ms(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"{name} must be a whole number of milliseconds, got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise InvalidArgument(
            f"{name} must be a whole number of milliseconds, got {value!r}"
        ) from None
    if not 1 <= n <= _DOWNTIME_MAX_MS:
        raise InvalidArgument(f"{name} must be 1 to {_DOWNTIME_MAX_MS} ms, got {n}")
    return n


def _optional_path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _insecure(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"insecure must be true or false, got {value!r}")
    return value


def _history_limit(value: Any) -> int:
    n = int(value)
    if n < 1:
        raise InvalidArgument("history_limit must be 1 or more")
    return n


def _metrics_listen(value: Any) -> str:
    parse_hostport(str(value))  # HOST:PORT, checked before anything starts
    return str(value)


def _networks(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise InvalidArgument('networks must be a table of NAME = "BRIDGE"')
    return dict(value)


def _storage_dirs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument("storage_dirs must be a list of directories")
    for path in value:
        if not path.startswith("/"):
            raise InvalidArgument(f"storage_dirs: '{path}' is not an absolute path")
    return tuple(os.path.normpath(p) for p in value)


# Settings whose value is converted by one function, by name.
_CONVERTERS: dict[str, Any] = {
    "state_dir": Path,
    "tls_dir": _optional_path,
    "insecure": _insecure,
    "history_limit": _history_limit,
    "metrics_listen": _metrics_listen,
    "networks": _networks,
    "storage_dirs": _storage_dirs,
    "downtime_limit_ms": lambda v: _downtime_ms("downtime_limit_ms", v),
    "downtime_limit_max_ms": lambda v: _downtime_ms("downtime_limit_max_ms", v),
}


def _coerce(name: str, value: Any) -> Any:
    if name in _CONVERTERS and value is not None:
        return _CONVERTERS[name](value)
    if name in ("migration_ports", "vnc_ports"):
        if isinstance(value, str):
            return _parse_ports(value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return _parse_ports(f"{int(value[0])}-{int(value[1])}")
        raise InvalidArgument(f"{name} must be 'MIN-MAX', got {value!r}")
    if name == "host_uuid" and value is not None:
        host_uuid = canonical_uuid_or_none(str(value))
        if host_uuid is None:
            raise InvalidArgument(f"host_uuid {value!r} is not a UUID")
        return host_uuid
    if name == "emulator" and value not in ("simvm", "qemu"):
        raise InvalidArgument(f"emulator must be 'simvm' or 'qemu', got {value!r}")
    if name in _SECONDS:
        v = float(value)
        if v < 0 or (v == 0 and name != "shutdown_grace"):
            raise InvalidArgument(f"{name} must be positive")
        return v
    if name in ("max_message_bytes", "max_xml_bytes"):
        return int(value)
    if name in ("max_incoming", "max_outgoing"):
        n = int(value)
        if n < 0:
            raise InvalidArgument(f"{name} must be 0 (no limit) or more")
        return n
    return value


def default_config_file(path: Path) -> Path | None:
    """``path`` if it exists (then it must be readable and valid: load_config says so),
    None if it does not: a host without a config file runs on defaults and options."""
    return path if path.exists() or path.is_symlink() else None


def load_config(
    args: argparse.Namespace, *, default_port: int, config_file: Path | None
) -> DaemonConfig:
    """Merge the TOML file (if any) with command-line options (which win)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise InvalidArgument(f"cannot read config file {config_file}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {config_file}: {exc}") from exc
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise InvalidArgument(f"config file {config_file}: unknown setting {key!r}")
            values[name] = value
    for name in _FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    values.setdefault("listen", f"127.0.0.1:{default_port}")
    if "state_dir" not in values:
        raise InvalidArgument("--state-dir is required (or state_dir in the config file)")
    coerced = {
        k: _coerce_emulator_key(k, v) if k in _EMULATOR_KEYS else _coerce(k, v)
        for k, v in values.items()
    }
    parse_hostport(str(coerced["listen"]), default_port)
    config = DaemonConfig(**coerced)
    if config.downtime_limit_max_ms < config.downtime_limit_ms:
        raise InvalidArgument(
            f"downtime_limit_max_ms ({config.downtime_limit_max_ms}) is below "
            f"downtime_limit_ms ({config.downtime_limit_ms})"
        )
    return config


def add_common_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default /etc/vmmigrate/%(prog)s.toml when it exists)",
    )
    ap.add_argument("--listen", help="HOST:PORT to serve on")
    ap.add_argument("--state-dir", dest="state_dir", help="the host state directory")
    ap.add_argument("--host-uuid", dest="host_uuid", help="override the host UUID")
    ap.add_argument("--hostname", help="hostname put in cookies (default: the system's)")
    ap.add_argument("--rpc-timeout", dest="rpc_timeout", type=float, help="peer RPC deadline, s")
    ap.add_argument(
        "--migration-timeout",
        dest="migration_timeout",
        type=float,
        help="deadline of a whole migration, s",
    )
    ap.add_argument(
        "--emulator",
        choices=["simvm", "qemu"],
        help="emulator for domains whose XML names none (default simvm)",
    )
    ap.add_argument(
        "--allow-qemu-commandline",
        dest="allow_qemu_commandline",
        action="store_true",
        default=None,
        help="accept <qemu:commandline> in definitions (the domain is marked tainted)",
    )
    ap.add_argument(
        "--shutdown-grace",
        dest="shutdown_grace",
        type=float,
        help="on SIGTERM, how long migrations in flight may take to finish, s (default 30)",
    )
    _add_security_and_logging_options(ap)


def _add_security_and_logging_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--tls-dir",
        dest="tls_dir",
        help="directory with ca.pem, cert.pem, key.pem (default /etc/vmmigrate/pki if present)",
    )
    ap.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve plaintext, without TLS or roles (otherwise loopback addresses only)",
    )
    ap.add_argument(
        "--metrics-listen",
        dest="metrics_listen",
        help="HOST:PORT to serve Prometheus metrics on (default: off)",
    )
    ap.add_argument(
        "--log-format",
        dest="log_format",
        choices=["auto", "json", "console"],
        help="log lines as JSON or for a console (default auto: console on a terminal)",
    )
    ap.add_argument(
        "--log-level",
        dest="log_level",
        choices=["debug", "info", "warning", "error"],
        help="least severe level logged (default info)",
    )
