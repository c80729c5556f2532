"""The QMP monitor: QEMU's JSON machine protocol on a unix socket, for several clients.

Each client gets the greeting, then is in capabilities-negotiation mode: only
``qmp_capabilities`` runs, anything else gets ``CommandNotFound`` (as QEMU), and no events
are sent. After it, commands run and events flow. Commands are registered with the mode
they need (:func:`command`), so the dispatcher is the only place modes are checked.

Messages are one JSON object per line. Replies echo ``id``. Events go to every client in
command mode, in QEMU's shape (``data`` omitted when empty, as QEMU does), in the order
they were emitted from whatever thread: they share one queue. An event emitted while a
command runs on the event loop reaches the wire before that command's reply (QEMU emits
STOP before replying to ``stop``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vmmigrate.simvm.emulator import CommandError, Emulator

log = logging.getLogger("simvm.monitor")

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 8, "minor": 0, "micro": 0}, "package": "simvm"},
        "capabilities": [],
    }
}
LINE_LIMIT = 1 << 20


class Mode(enum.Enum):
    NEGOTIATION = "negotiation"  # after the greeting: only qmp_capabilities; no events
    COMMAND = "command"  # after qmp_capabilities: every command; events flow


class Args:
    """A command's arguments, checked as QEMU's QAPI visitors do (with their messages)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = raw
        self._seen: set[str] = set()

    def _get(self, name: str, kind: type, word: str, default: Any = ...) -> Any:
        self._seen.add(name)
        if name not in self._raw:
            if default is ...:
                raise CommandError(f"Parameter '{name}' is missing")
            return default
        value = self._raw[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CommandError(f"Invalid parameter type for '{name}', expected: {word}")
        return value

    def text(self, name: str) -> str:
        value: str = self._get(name, str, "string")
        return value

    def integer(self, name: str) -> int:
        value: int = self._get(name, int, "integer")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value: bool = self._get(name, bool, "boolean", default)
        return value

    def array(self, name: str) -> list[Any]:
        value: list[Any] = self._get(name, list, "array")
        return value

    def rest(self) -> dict[str, Any]:
        """All arguments not read yet (commands whose arguments are a flat set)."""
        return {k: v for k, v in self._raw.items() if k not in self._seen}

    def done(self) -> None:
        for name in self._raw:
            if name not in self._seen:
                raise CommandError(f"Parameter '{name}' is unexpected")


Handler = Callable[[Emulator, Args], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    mode: Mode
    handler: Handler


COMMANDS: dict[str, Command] = {}


def command(name: str, mode: Mode = Mode.COMMAND) -> Callable[[Handler], Handler]:
    """Register a QMP command and the monitor mode it needs."""

    def register(fn: Handler) -> Handler:
        COMMANDS[name] = Command(name, mode, fn)
        return fn

    return register


# -- the commands ---------------------------------------------------------------------------


@command("qmp_capabilities", Mode.NEGOTIATION)
async def _qmp_capabilities(em: Emulator, args: Args) -> Any:
    enable = args.array("enable") if "enable" in args.rest() else []
    args.done()
    for cap in enable:  # the greeting offers none (no out-of-band execution)
        raise CommandError(f"Capability '{cap}' not available")
    return {}


@command("query-status")
async def _query_status(em: Emulator, args: Args) -> Any:
    args.done()
    return em.query_status()


@command("stop")
async def _stop(em: Emulator, args: Args) -> Any:
    args.done()
    em.stop()
    return {}


@command("cont")
async def _cont(em: Emulator, args: Args) -> Any:
    args.done()
    em.cont()
    return {}


@command("quit")
async def _quit(em: Emulator, args: Args) -> Any:
    args.done()
    em.quit()
    return {}


@command("query-name")
async def _query_name(em: Emulator, args: Args) -> Any:
    args.done()
    return {"name": em.name} if em.name else {}


@command("query-uuid")
async def _query_uuid(em: Emulator, args: Args) -> Any:
    args.done()
    return {"UUID": em.uuid}


@command("query-version")
async def _query_version(em: Emulator, args: Args) -> Any:
    args.done()
    return GREETING["QMP"]["version"]


@command("query-commands")
async def _query_commands(em: Emulator, args: Args) -> Any:
    args.done()
    return [{"name": name} for name in sorted(COMMANDS)]


@command("migrate")
async def _migrate(em: Emulator, args: Args) -> Any:
    uri = args.text("uri")
    args.flag("detach", False)  # accepted and ignored, as QEMU
    for flag in ("blk", "inc", "resume"):
        if args.flag(flag, False):
            raise CommandError(f"simvm does not support migrate '{flag}'")
    args.done()
    em.migrate(uri)
    return {}


@command("migrate-incoming")
async def _migrate_incoming(em: Emulator, args: Args) -> Any:
    uri = args.text("uri")
    args.done()
    em.migrate_incoming(uri)
    return {}


@command("migrate_cancel")
async def _migrate_cancel(em: Emulator, args: Args) -> Any:
    args.done()
    em.migrate_cancel()
    return {}


@command("query-migrate")
async def _query_migrate(em: Emulator, args: Args) -> Any:
    args.done()
    return em.query_migrate()


@command("migrate-set-parameters")
async def _migrate_set_parameters(em: Emulator, args: Args) -> Any:
    em.set_parameters(args.rest())
    return {}


@command("query-migrate-parameters")
async def _query_migrate_parameters(em: Emulator, args: Args) -> Any:
    args.done()
    return em.params.to_qmp()


@command("migrate-set-capabilities")
async def _migrate_set_capabilities(em: Emulator, args: Args) -> Any:
    caps = args.array("capabilities")
    args.done()
    em.set_capabilities(caps)
    return {}


@command("query-migrate-capabilities")
async def _query_migrate_capabilities(em: Emulator, args: Args) -> Any:
    args.done()
    return em.caps.to_qmp()


@command("x-simvm-checksum")
async def _checksum(em: Emulator, args: Args) -> Any:
    args.done()
    return await asyncio.to_thread(em.checksum)  # hashing 512 MiB takes a moment


@command("x-simvm-set-dirty-rate")
async def _set_dirty_rate(em: Emulator, args: Args) -> Any:
    rate = args.integer("pages-per-second")
    args.done()
    em.set_dirty_rate(rate)
    return {}


@command("x-simvm-dirty")
async def _dirty(em: Emulator, args: Args) -> Any:
    pages = args.integer("pages")
    args.done()
    if pages < 0:
        raise CommandError("Parameter 'pages' expects a non-negative integer")
    await asyncio.to_thread(em.machine.dirty, pages)
    return {}


@command("x-simvm-query-disks")
async def _query_disks(em: Emulator, args: Args) -> Any:
    args.done()
    return em.machine.disk_status()


# QEMU's storage-copy commands (a live migration's disk mirror and its NBD server): simvm
# writes its disks in place and copies none, so it refuses them by name; vmmigrate refuses
# storage copy of a simvm domain before it gets here.
STORAGE_COPY_COMMANDS = (
    "drive-mirror",
    "blockdev-mirror",
    "nbd-server-start",
    "nbd-server-add",
    "block-export-add",
)


def _refuse_storage_copy(name: str) -> Handler:
    async def refuse(em: Emulator, args: Args) -> Any:
        raise CommandError(f"simvm does not implement '{name}': storage copy needs QEMU")

    return refuse


for _name in STORAGE_COPY_COMMANDS:
    command(_name)(_refuse_storage_copy(_name))


# -- the protocol ---------------------------------------------------------------------------


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.mode = Mode.NEGOTIATION

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")


class Monitor:
    """The QMP server. Create it on the event loop; :meth:`emit` works from any thread."""

    def __init__(self) -> None:
        self.emulator: Emulator | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._clients: set[_Client] = set()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._queue_lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._path = ""

    async def start(self, path: str) -> None:
        """Listen on ``path``. The path appears only once the socket listens (bound under a
        temporary name, then renamed), so a driver that waits for the path and connects
        once never sees ECONNREFUSED. A stale socket there is replaced, as QEMU does."""
        tmp = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            sock.listen(16)
            os.rename(tmp, path)
        except OSError:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._path = path
        self._server = await asyncio.start_unix_server(self._session, sock=sock, limit=LINE_LIMIT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            with contextlib.suppress(OSError, ConnectionError):
                client.writer.close()
                await asyncio.wait_for(client.writer.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        now = time.time()
        msg: dict[str, Any] = {"event": event}
        if data:
            msg["data"] = data
        msg["timestamp"] = {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}
        with self._queue_lock:
            self._queue.append(msg)
        if threading.get_ident() == self._loop_thread:
            self._flush()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody to tell
                self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        """Send queued events in emission order (one queue for every thread's events)."""
        while True:
            with self._queue_lock:
                if not self._queue:
                    return
                msg = self._queue.popleft()
            log.debug("event %s", msg)
            for client in list(self._clients):
                if client.mode is Mode.COMMAND:
                    client.send(msg)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        try:
            client.send(GREETING)
            await writer.drain()
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the limit: drop the client
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply = await self._dispatch(client, line)
                client.send(reply)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer
        finally:
            self._clients.discard(client)
            writer.close()

    async def _dispatch(self, client: _Client, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            return _error(CommandError(f"JSON parse error, {exc}"), {})
        if not isinstance(msg, dict):
            return _error(CommandError("QMP input must be a JSON object"), {})
        try:
            name, arguments = _parse_request(msg)
            cmd = COMMANDS.get(name)
            if cmd is None:
                raise CommandError(f"The command {name} has not been found", "CommandNotFound")
            if cmd.mode is not client.mode:
                if client.mode is Mode.NEGOTIATION:
                    raise CommandError(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                        "CommandNotFound",
                    )
                raise CommandError(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                )
            assert self.emulator is not None
            result = await cmd.handler(self.emulator, Args(arguments))
            if name == "qmp_capabilities":
                client.mode = Mode.COMMAND
        except CommandError as exc:
            log.info("qmp %s: %s", msg.get("execute"), exc.desc)
            return _error(exc, msg)
        except Exception as exc:  # a bug in simvm: answer it, keep serving (QEMU would abort)
            log.exception("qmp %s crashed", msg.get("execute"))
            return _error(CommandError(f"internal error: {exc}"), msg)
        reply: dict[str, Any] = {"return": result}
        if "id" in msg:
            reply["id"] = msg["id"]
        return reply


def _parse_request(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for key in msg:
        if key not in ("execute", "arguments", "id"):
            raise CommandError(f"QMP input member '{key}' is unexpected")
    name = msg.get("execute")
    if name is None:
        raise CommandError("QMP input lacks member 'execute'")
    if not isinstance(name, str):
        raise CommandError("QMP input member 'execute' must be a string")
    arguments = msg.get("arguments", {})
    if not isinstance(arguments, dict):
        raise CommandError("QMP input member 'arguments' must be an object")
    return name, arguments


def _error(exc: CommandError, msg: dict[str, Any]) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": exc.cls, "desc": exc.desc}}
    if "id" in msg:
        reply["id"] = msg["id"]
    return reply
