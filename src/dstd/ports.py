"""Migration ports of the destination host (libvirt's migration_port_min/max)."""

from __future__ import annotations

import socket
import threading

from vmmigrate.common.errors import HostBusy


class PortAllocator:
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def acquire(self, host: str) -> int:
        """A port in the range that nothing on ``host`` listens on, held until release()."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with self._lock:
            for port in range(self.lo, self.hi + 1):
                if port in self._used:
                    continue
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((host, port))
                    except OSError:
                        continue
                self._used.add(port)
                return port
        raise HostBusy(f"Unable to find an unused port in range 'migration' ({self.lo}-{self.hi})")

    def release(self, port: int) -> None:
        with self._lock:
            self._used.discard(port)
