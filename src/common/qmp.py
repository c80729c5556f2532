"""An asyncio QMP client (QEMU's JSON machine protocol), for real QEMU and for simvm.

    QMPError (OperationFailed)          the monitor failed us
     +-- QMPConnectError                 cannot connect / handshake failed
     +-- QMPExecuteError                 the command returned {"error": ...}; keeps
     |                                   .sent and .received as evidence
     +-- QMPDisconnected                 the emulator went away mid-conversation

Every command has a deadline. One reader task dispatches replies (by id) and events (to
subscribers); when the connection drops, every waiter fails with QMPDisconnected and the
client goes back to IDLE, so a caller can always reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
from collections.abc import Callable
from typing import Any

import structlog
from vmmigrate.common.errors import OperationFailed

log = structlog.get_logger("vmmigrate.qmp")

DEFAULT_TIMEOUT = 10.0


class QMPError(OperationFailed):
    """Root of QMP errors."""


class QMPConnectError(QMPError):
    pass


class QMPDisconnected(QMPError):
    pass


class QMPExecuteError(QMPError):
    def __init__(self, sent: dict[str, Any], received: dict[str, Any]) -> None:
        err = received.get("error", {})
        super().__init__(f"{err.get('class', 'GenericError')}: {err.get('desc', 'unknown error')}")
        self.sent = sent
        self.received = received
        self.error_class = str(err.get("class", "GenericError"))
        self.desc = str(err.get("desc", ""))


class Runstate(enum.Enum):
    IDLE = "idle"  # not connected; connect() moves to CONNECTING
    CONNECTING = "connecting"  # socket open, greeting and capabilities negotiation under way
    RUNNING = "running"  # ready: commands may be sent, events flow
    DISCONNECTING = "disconnecting"  # close() in progress; next IDLE


EventHandler = Callable[[dict[str, Any]], None]


class QMPClient:
    """One QMP connection over a unix socket."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.runstate = Runstate.IDLE
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._handlers: list[EventHandler] = []
        self._lock = asyncio.Lock()
        self.greeting: dict[str, Any] = {}
        self.migration_events = False  # the "events" migration capability is on
        # the emulator announced its end (SHUTDOWN): a monitor that closes after it saw a
        # shutdown, without it a crash (libvirt's rule for an emulator that goes)
        self.shutdown_seen = False

    def on_event(self, handler: EventHandler) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler) if handler in self._handlers else None

    async def connect(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if self.runstate is not Runstate.IDLE:
            raise QMPConnectError(f"QMP client {self.name} is {self.runstate.value}")
        self.runstate = Runstate.CONNECTING
        try:
            async with asyncio.timeout(timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(
                    path, limit=16 * 1024 * 1024
                )
                line = await self._reader.readline()
                if not line:
                    raise QMPConnectError(f"QMP socket {path} closed before the greeting")
                self.greeting = json.loads(line)
                if "QMP" not in self.greeting:
                    raise QMPConnectError(f"QMP socket {path}: not a QMP greeting")
            self._task = asyncio.ensure_future(self._read_loop())
            self.runstate = Runstate.RUNNING
            await self.execute("qmp_capabilities", timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            await self._teardown()
            raise QMPConnectError(f"cannot connect to QMP socket {path}: {exc}") from exc
        except BaseException:
            await self._teardown()
            raise

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("qmp_garbage", vm=self.name, line=line[:200])
                    continue
                if "event" in msg:
                    if msg["event"] == "SHUTDOWN":
                        self.shutdown_seen = True
                    for handler in list(self._handlers):
                        handler(msg)
                    continue
                fut = self._pending.pop(str(msg.get("id", "")), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(QMPDisconnected(f"QMP connection to {self.name} lost"))
            self._pending.clear()
            if self.runstate is Runstate.RUNNING:
                self.runstate = Runstate.DISCONNECTING
                await self._close_writer()
                self.runstate = Runstate.IDLE

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run one command; returns its "return" value, raises QMPExecuteError on "error"."""
        if self.runstate is not Runstate.RUNNING or self._writer is None:
            raise QMPDisconnected(f"QMP client {self.name} is not connected")
        mid = f"vm{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": mid}
        if arguments:
            msg["arguments"] = arguments
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        try:
            async with self._lock:
                self._writer.write(json.dumps(msg).encode() + b"\n")
                await self._writer.drain()
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError:
            raise QMPError(f"QMP command {command} to {self.name} timed out") from None
        except OSError as exc:
            raise QMPDisconnected(f"QMP connection to {self.name} lost: {exc}") from exc
        finally:
            self._pending.pop(mid, None)
        if "error" in reply:
            raise QMPExecuteError(msg, reply)
        return reply.get("return")

    async def _close_writer(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _teardown(self) -> None:
        self.runstate = Runstate.DISCONNECTING
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        await self._close_writer()
        self.runstate = Runstate.IDLE

    async def close(self) -> None:
        if self.runstate is not Runstate.IDLE:
            await self._teardown()
