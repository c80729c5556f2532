"""systemd's readiness protocol (sd_notify), written by hand: no systemd library.

A service started with Type=notify tells the service manager it is ready by sending a
datagram ``READY=1`` (with ``STATUS=...`` for ``systemctl status``) to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``; ``STOPPING=1`` when it begins to stop. A name that starts
with ``@`` is in the abstract namespace (a leading NUL byte on the wire). Without
``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing. A failed send is
logged and ignored: readiness is a courtesy to the manager, never a reason to stop serving.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

ENV_VAR = "NOTIFY_SOCKET"

log = structlog.get_logger("vmmigrate.sdnotify")


def socket_address(name: str) -> str | bytes:
    """The address to send to: ``@NAME`` is abstract (NUL + NAME), anything else a path."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to the service manager; True if it was sent."""
    env = os.environ if environ is None else environ
    name = env.get(ENV_VAR, "")
    if not name:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(socket_address(name))
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", socket=name, error=str(exc))
        return False
    return True
