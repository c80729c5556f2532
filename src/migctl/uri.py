"""DESTURI: the destination host as migctl takes it.

Two spellings name one dstd:

- ``HOST``, ``HOST:PORT``, ``[V6]:PORT``: dstd's address (port 7302 unless given);
- libvirt's connection URIs, so that a ``virsh migrate`` line works as it is:
  ``qemu+tls://HOST/system``, ``qemu://HOST/system`` (libvirt's default transport is TLS),
  ``qemu+tcp://HOST[:PORT]/system``. The host is the destination's; a port in the URI is
  taken as dstd's port (libvirt's would be libvirtd's, 16514 or 16509: a vmmigrate host has
  no libvirtd, and dstd is what listens for the destination's side). Without a port, 7302.

Transports that would run a program or need a local socket (``ssh``, ``libssh``, ``ext``,
``unix``), other drivers, URIs without a host, the session instance and URI parameters are
refused before any daemon is called.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from vmmigrate.common.address import DEFAULT_DSTD_PORT, format_hostport, parse_hostport
from vmmigrate.common.errors import InvalidArgument

# transports that reach the destination over the network, as dstd does (TLS is decided by
# the cluster's --tls-dir / --insecure, not by the URI)
NETWORK_TRANSPORTS = ("", "tls", "tcp")


def dest_address(desturi: str) -> str:
    """dstd's HOST:PORT for a DESTURI in any accepted form."""
    if "://" not in desturi:
        host, port = parse_hostport(desturi, DEFAULT_DSTD_PORT)
        return format_hostport(host, port)
    return _from_libvirt_uri(desturi)


def _from_libvirt_uri(desturi: str) -> str:
    parts = urlsplit(desturi)
    driver, _, transport = parts.scheme.partition("+")
    if driver != "qemu":
        raise InvalidArgument(
            f"destination URI '{desturi}': only the qemu driver is supported, not '{driver}'"
        )
    if transport not in NETWORK_TRANSPORTS:
        raise InvalidArgument(
            f"destination URI '{desturi}': transport '{transport}' is not supported; "
            "use qemu+tls://HOST/system (or HOST[:PORT])"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise InvalidArgument(f"destination URI '{desturi}': invalid port") from None
    if not host:
        raise InvalidArgument(f"destination URI '{desturi}' names no host")
    if parts.path not in ("/system", "/system/", ""):
        raise InvalidArgument(
            f"destination URI '{desturi}': only the system instance (/system) is supported"
        )
    if parts.query or parts.fragment or parts.username:
        raise InvalidArgument(
            f"destination URI '{desturi}': user names and URI parameters are not supported"
        )
    return format_hostport(host, DEFAULT_DSTD_PORT if port is None else port)
