"""The destination side of a migration: ``-incoming tcp:HOST:PORT`` or ``unix:PATH``.

The listening socket is bound at startup (before the QMP socket appears, so a started simvm
is always ready to receive); ``tcp:HOST:0`` binds a free port, which query-migrate reports
in ``socket-address`` as QEMU does. One thread accepts exactly one connection, then:

1. reads the header and checks page size, page count and VM uuid against this VM;
2. applies every record (:class:`simvm.stream.Loader` checks every CRC and pass count);
3. on 'E', checks the sha256 of its memory against the declared one, sends ACK, and only
   then leaves ``inmigrate``: ``running``, or ``paused`` with -S (``cont`` meanwhile turns
   autostart on and ``stop`` off, as in QEMU).

Any failure (corruption, checksum, truncation, a closed connection, a bad header) sends a
NAK with the reason when the connection still allows it, prints
``simvm: load of migration failed: REASON`` to stderr and makes the process exit with
status 1, as QEMU does after a failed incoming migration.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from vmmigrate.simvm import stream
from vmmigrate.simvm.machine import Machine, RunState
from vmmigrate.simvm.migration import Capabilities, EmitFn, MigrationStatus, StatusCell
from vmmigrate.simvm.outgoing import parse_migration_uri

log = logging.getLogger("simvm.incoming")


class IncomingMigration:
    def __init__(
        self,
        machine: Machine,
        vm_uuid: str,
        uri: str,
        caps: Capabilities,
        emit: EmitFn,
        *,
        autostart: bool,
        on_failure: Callable[[str], None],
    ) -> None:
        self._machine = machine
        self._vm_uuid = vm_uuid
        self._addr = parse_migration_uri(uri)
        self._on_failure = on_failure
        self.status = StatusCell("destination", emit, lambda: caps.events)
        self._autostart = autostart
        self._arrival = threading.Lock()  # orders cont/stop against the memory's arrival
        self._arrived = False
        self.source_sha256: str | None = None
        self.error = ""
        self._listener: socket.socket | None = None
        self._bound: tuple[str, int] | str = self._addr
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="simvm-migrate-in", daemon=True)

    def listen(self) -> None:
        """Bind and listen now; OSError when the address is unusable."""
        if isinstance(self._addr, str):  # unix:PATH (QEMU replaces a stale socket file)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._addr)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockaddr: Any = self._addr
        else:
            host, port = self._addr
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, type_, proto, _, sockaddr = infos[0]
            listener = socket.socket(family, type_, proto)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(sockaddr)
            listener.listen(1)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        if not isinstance(self._addr, str):
            self._bound = (self._addr[0], listener.getsockname()[1])
        self.status.advance(MigrationStatus.SETUP)

    def start(self) -> None:
        self._thread.start()

    def set_autostart(self, on: bool) -> bool:
        """cont / stop while inmigrate; False once the memory has arrived (too late: the
        run state has moved, and the caller acts on it instead)."""
        with self._arrival:
            if self._arrived:
                return False
            self._autostart = on
            return True

    def close(self) -> None:
        for sock in (self._listener, self._conn):
            if sock is not None:
                with contextlib.suppress(OSError):  # a listener, or already disconnected
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def info(self) -> dict[str, Any]:
        """query-migrate on the destination (QEMU reports status and the bound address)."""
        info: dict[str, Any] = {"status": self.status.value.value}
        if self.status.value is MigrationStatus.SETUP:
            if isinstance(self._bound, str):
                info["socket-address"] = [{"type": "unix", "path": self._bound}]
            else:
                host, port = self._bound
                info["socket-address"] = [{"type": "inet", "host": host, "port": str(port)}]
        if self.status.value is MigrationStatus.FAILED:
            info["error-desc"] = self.error
        return info

    def _run(self) -> None:
        assert self._listener is not None
        try:
            conn, peer = self._listener.accept()
        except OSError as exc:
            log.info("incoming listener closed: %s", exc)
            return
        self._listener.close()
        self._conn = conn
        log.info("incoming migration from %s", peer)
        self.status.advance(MigrationStatus.ACTIVE)
        try:
            declared = self._load(conn)
            conn.sendall(stream.ACK)
        except (stream.StreamError, OSError) as exc:
            self._fail(conn, str(exc) or type(exc).__name__)
            return
        self.source_sha256 = declared.hex()
        with self._arrival:
            self._arrived = True
            self._machine.transition(RunState.RUNNING if self._autostart else RunState.PAUSED)
        self.status.advance(MigrationStatus.COMPLETED)
        conn.close()

    def _load(self, conn: socket.socket) -> bytes:
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = stream.StreamReader(io.BufferedReader(socket.SocketIO(conn, "rb"), 1 << 20))
        header = stream.Header.parse(reader.read(stream.HEADER.size))
        m = self._machine
        if header.page_size != m.page_size:
            raise stream.StreamError(
                f"page size mismatch: stream {header.page_size}, this VM {m.page_size}"
            )
        if header.page_count != m.page_count:
            raise stream.StreamError(
                f"memory size mismatch: stream has {header.page_count} pages, "
                f"this VM {m.page_count}"
            )
        if header.vm_uuid != self._vm_uuid:
            raise stream.StreamError(
                f"VM uuid mismatch: stream is for {header.vm_uuid}, this VM is {self._vm_uuid}"
            )
        return stream.Loader(reader, m.view, header).run(m.sha256)

    def _fail(self, conn: socket.socket, reason: str) -> None:
        self.error = reason
        self.status.advance(MigrationStatus.FAILED)
        with contextlib.suppress(OSError):  # the source is gone already: nobody to tell
            conn.sendall(stream.encode_nak(reason))
        conn.close()
        self._on_failure(reason)
