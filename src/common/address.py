"""Daemon addresses (HOST:PORT) and default ports.

Kept apart from common.config so that migctl, whose start-up is timed by every user, does
not import the daemons' configuration machinery (tomllib, uuid, pathlib) to parse one
address.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from vmmigrate.common.errors import ArgumentUnsupported, InvalidArgument

DEFAULT_SRCD_PORT = 7301
DEFAULT_DSTD_PORT = 7302
# Where srcd, dstd and migctl look for ca.pem, cert.pem, key.pem without --tls-dir (as
# libvirt's /etc/pki/libvirt). Here rather than in common.tls: migctl decides between
# plaintext and TLS before it imports the TLS machinery (common/tls.py).
DEFAULT_TLS_DIR = Path("/etc/vmmigrate/pki")


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or (with a default port) 'HOST' -> (host, port)."""
    host, sep, port_s = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        inner, _, rest = text[1:].partition("]")
        host = inner
        port_s = rest[1:] if rest.startswith(":") else ""
        sep = ":" if port_s else ""
    if not sep or (not text.startswith("[") and ":" in host):
        if default_port is None:
            raise InvalidArgument(f"address {text!r} must be HOST:PORT")
        host, port_s = text.strip("[]"), str(default_port)
    try:
        port = int(port_s)
    except ValueError:
        raise InvalidArgument(f"invalid port in address {text!r}") from None
    if not host or not (0 <= port <= 65535):
        raise InvalidArgument(f"invalid address {text!r}")
    return host, port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether HOST (an address or a name) is this machine's loopback only: the one place
    plaintext needs no --insecure."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# A host name as DNS allows it (letters, digits, hyphens and dots), or an IP address.
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?")


def check_migration_uri(uri: str) -> str:
    """The URI a client asks the source's emulator to migrate to: only what a Prepare
    answers, ``tcp:HOST:PORT``. QEMU also takes ``exec:`` (a shell command run as the
    emulator's user), ``file:``, ``fd:`` and ``unix:`` (any socket on the source host);
    none of those may come from a client. libvirt's text for another scheme."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme != "tcp":
        shown = scheme if sep else uri
        raise ArgumentUnsupported(f"unsupported scheme {shown} in migration URI {uri}")
    host, port = parse_hostport(rest)
    valid_host = _HOSTNAME.fullmatch(host) is not None
    if not valid_host:
        try:
            ipaddress.ip_address(host)
            valid_host = True
        except ValueError:
            pass
    if not valid_host or port == 0:
        raise InvalidArgument(f"invalid migration URI {uri}")
    return uri
