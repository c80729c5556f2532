"""simvm: real simvm processes on loopback and unix sockets, driven over QMP.

A tiny asyncio QMP client lives here (not in src/: the product's client is common.qmp).
Every process a test starts is recorded and stopped by its pid in teardown; so is every
proxy thread's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from vmmigrate.simvm import stream
from vmmigrate.simvm.migration import Decision, Parameters, PassStats, decide

UUID = "6f1c1a8e-3b0e-4d55-9a57-0f3c2b1d9e01"
Mangle = Callable[[int, bytes], "bytes | None"] | None
FINAL = {"completed", "failed", "cancelled"}


# -- a tiny asyncio QMP client ----------------------------------------------------------------


class QMPError(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply["error"]["desc"])
        self.cls = reply["error"]["class"]
        self.desc = reply["error"]["desc"]


class QMP:
    """One connection; commands one at a time (replies come in order), events collected."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.events: list[dict[str, Any]] = []
        self._event_seen = asyncio.Event()
        self.greeting: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str, negotiate: bool = True) -> QMP:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        q = cls(reader, writer)
        q.greeting = json.loads(await reader.readline())
        q._task = asyncio.ensure_future(q._read())
        if negotiate:
            await q.ok("qmp_capabilities")
        return q

    async def _read(self) -> None:
        while line := await self._reader.readline():
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                self._event_seen.set()
            else:
                await self._replies.put(msg)

    async def send(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._writer.write(json.dumps(msg).encode() + b"\n")
        await self._writer.drain()
        return await asyncio.wait_for(self._replies.get(), 10)

    async def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        return await self.send(msg)

    async def ok(self, name: str, **args: Any) -> Any:
        reply = await self.cmd(name, **args)
        if "error" in reply:
            raise QMPError(reply)
        return reply["return"]

    async def event(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.events:
                    if ev["event"] == name:
                        self.events.remove(ev)
                        return ev
                self._event_seen.clear()
                await self._event_seen.wait()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- processes and proxies, stopped in teardown -------------------------------------------------


class VM:
    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], qmp: str, log: Path, clients: list[QMP]
    ) -> None:
        self.name = name
        self.proc = proc
        self.qmp_path = qmp
        self.log = log
        self._clients = clients

    async def connect(self, negotiate: bool = True) -> QMP:
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                q = await QMP.connect(self.qmp_path, negotiate)
                self._clients.append(q)
                return q
            except FileNotFoundError:  # once the path exists, simvm listens on it
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"{self.name} did not exit"
            await asyncio.sleep(0.02)
        return self.proc.returncode


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.vms: list[VM] = []
        self.sockets: list[socket.socket] = []
        self.clients: list[QMP] = []

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a test body; its QMP clients are closed on its own event loop afterwards."""

        async def main() -> None:
            try:
                await asyncio.wait_for(coro, 45)
            finally:
                for q in self.clients:
                    await q.close()
                self.clients.clear()

        asyncio.run(main())

    def start(self, name: str, *args: str, mib: int = 16, uuid: str = UUID) -> VM:
        qmp = str(self.tmp / f"{name}.qmp")
        log = self.tmp / f"{name}.log"
        argv = [
            sys.executable,
            "-m",
            "vmmigrate.simvm",
            "-name",
            name,
            "-uuid",
            uuid,
            "-m",
            str(mib),
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
            *args,
        ]
        with log.open("wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        vm = VM(name, proc, qmp, log, self.clients)
        self.vms.append(vm)
        return vm

    def stop_all(self) -> None:
        for vm in self.vms:
            if vm.proc.poll() is None:
                os.kill(vm.proc.pid, signal.SIGTERM)
                try:
                    vm.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(vm.proc.pid, signal.SIGKILL)
                    vm.proc.wait(5)
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def proxy(self, target: tuple[str, int], forth: Mangle = None, back: Mangle = None) -> int:
        """A man in the middle. Bytes each way pass through ``mangle(offset, chunk)``; a
        mangle that returns None cuts the whole connection there (both sockets)."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.sockets.append(listener)

        def pump(a: socket.socket, b: socket.socket, mangle: Mangle) -> None:
            offset = 0
            with contextlib.suppress(OSError):
                while data := a.recv(1 << 16):
                    out = mangle(offset, data) if mangle else data
                    if out is None:
                        for s in (a, b):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                    offset += len(data)
                    b.sendall(out)
            with contextlib.suppress(OSError):  # pass the end on, keep the other way open
                b.shutdown(socket.SHUT_WR)

        def serve() -> None:
            with contextlib.suppress(OSError):
                src, _ = listener.accept()
                dst = socket.create_connection(target)
                self.sockets += [src, dst]
                threading.Thread(target=pump, args=(dst, src, back), daemon=True).start()
                pump(src, dst, forth)

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.stop_all()


async def incoming_port(q: QMP) -> int:
    info = await q.ok("query-migrate")
    assert info["status"] == "setup"
    return int(info["socket-address"][0]["port"])


async def wait_reply(
    q: QMP,
    command: str,
    until: Callable[[dict[str, Any]], bool],
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Ask ``command`` again until its reply satisfies ``until``; that reply."""
    deadline = time.monotonic() + timeout
    while True:
        reply: dict[str, Any] = await q.ok(command)
        if until(reply):
            return reply
        assert time.monotonic() < deadline, f"{command} still {reply}"
        await asyncio.sleep(0.02)


def passes_done(info: dict[str, Any]) -> int:
    return int(info.get("ram", {}).get("dirty-sync-count", 0))


async def wait_migration(q: QMP, timeout: float = 20.0) -> dict[str, Any]:
    return await wait_reply(q, "query-migrate", lambda i: i.get("status") in FINAL, timeout)


async def status(q: QMP) -> str:
    return str((await q.ok("query-status"))["status"])


# -- QMP surface --------------------------------------------------------------------------------


def test_handshake_refuses_commands_before_capabilities_negotiation(lab: Lab) -> None:
    vm = lab.start("hs", "-S")

    async def body() -> None:
        q = await vm.connect(negotiate=False)
        assert q.greeting == {
            "QMP": {
                "version": {"qemu": {"major": 8, "minor": 0, "micro": 0}, "package": "simvm"},
                "capabilities": [],
            }
        }
        reply = await q.send({"execute": "query-status", "id": "a1"})
        assert reply == {
            "id": "a1",
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
        }
        assert await q.send({"execute": "qmp_capabilities", "id": 7}) == {"return": {}, "id": 7}
        again = await q.cmd("qmp_capabilities")
        assert again["error"]["class"] == "CommandNotFound"
        assert (await q.cmd("no-such-command"))["error"] == {
            "class": "CommandNotFound",
            "desc": "The command no-such-command has not been found",
        }
        assert (await q.cmd("migrate"))["error"]["desc"] == "Parameter 'uri' is missing"
        assert (await q.send({"execute": "stop", "bogus": 1}))["error"]["class"] == "GenericError"
        assert await q.ok("query-name") == {"name": "hs"}
        assert await q.ok("query-uuid") == {"UUID": UUID}
        assert await q.ok("query-migrate") == {}  # before any migration, as QEMU

    lab.run(body())


def test_run_states_events_and_quit(lab: Lab) -> None:
    vm = lab.start("rs", "-S")

    async def body() -> None:
        q = await vm.connect()
        watcher = await vm.connect()  # a second client sees the events too
        assert await q.ok("query-status") == {
            "status": "prelaunch",
            "running": False,
            "singlestep": False,
        }
        await q.ok("cont")
        assert (await q.event("RESUME"))["timestamp"].keys() == {"seconds", "microseconds"}
        assert await status(q) == "running"
        await q.ok("stop")
        await q.event("STOP")
        assert await status(q) == "paused"
        await q.ok("stop")  # no-op when not running: no second STOP
        await q.ok("cont")
        await q.event("RESUME")
        for name in ("RESUME", "STOP", "RESUME"):
            await watcher.event(name)
        assert [e["event"] for e in q.events] == []
        await q.ok("quit")
        shutdown = await watcher.event("SHUTDOWN")
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert await vm.wait_exit() == 0

    lab.run(body())
    assert not os.path.exists(vm.qmp_path)  # simvm removes its QMP socket on the way out


def test_parameters_and_capabilities(lab: Lab) -> None:
    vm = lab.start("pc", "-S")

    async def body() -> None:
        q = await vm.connect()
        params = await q.ok("query-migrate-parameters")
        assert params["downtime-limit"] == 300 and params["cpu-throttle-initial"] == 20
        assert params["cpu-throttle-increment"] == 10 and params["max-bandwidth"] == 0
        await q.ok("migrate-set-parameters", **{"max-bandwidth": 1 << 20, "downtime-limit": 50})
        params = await q.ok("query-migrate-parameters")
        assert params["max-bandwidth"] == 1 << 20 and params["downtime-limit"] == 50
        with pytest.raises(QMPError, match="cpu_throttle_initial"):
            await q.ok("migrate-set-parameters", **{"cpu-throttle-initial": 100})
        caps = [
            {"capability": "auto-converge", "state": True},
            {"capability": "events", "state": True},
        ]
        await q.ok("migrate-set-capabilities", capabilities=caps)
        assert await q.ok("query-migrate-capabilities") == caps
        with pytest.raises(QMPError, match="postcopy-ram"):
            await q.ok(
                "migrate-set-capabilities",
                capabilities=[{"capability": "postcopy-ram", "state": True}],
            )
        with pytest.raises(QMPError, match="valid migration protocol"):
            await q.ok("migrate", uri="exec:cat")

    lab.run(body())


# -- migration ----------------------------------------------------------------------------------


def test_precopy_converges_and_memory_arrives_intact(lab: Lab) -> None:
    src = lab.start("src", "-seed", "1", "-dirty-rate", "3000", mib=64)
    dst = lab.start("dst", "-incoming", "tcp:127.0.0.1:0", "-dirty-rate", "1000", mib=64)

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        assert await status(d) == "inmigrate"
        await s.ok("migrate-set-parameters", **{"max-bandwidth": 256 << 20})  # 256 MiB/s
        await s.ok(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{await incoming_port(d)}")
        with pytest.raises(QMPError, match="migration process in progress"):
            await s.ok("migrate", uri="tcp:127.0.0.1:1")
        info = await wait_migration(s)
        assert info["status"] == "completed", info
        ram = info["ram"]
        assert ram["total"] == 64 << 20 and ram["remaining"] == 0
        assert ram["transferred"] >= ram["total"] and ram["dirty-sync-count"] >= 1
        assert info["downtime"] >= 0 and ram["page-size"] == 4096
        assert await status(s) == "postmigrate"
        await s.event("STOP")
        assert [e["data"]["status"] for e in s.events if e["event"] == "MIGRATION"] == [
            "setup",
            "active",
            "completed",
        ]
        assert await status(d) == "running"
        await d.event("RESUME")
        here, there = await s.ok("x-simvm-checksum"), await d.ok("x-simvm-checksum")
        assert there["source-sha256"] == here["sha256"]
        # the destination's vCPU runs: wait until it has written to its memory
        await wait_reply(d, "x-simvm-checksum", lambda c: c["writes"] > there["writes"])
        await d.ok("stop")
        assert (await d.ok("x-simvm-checksum"))["sha256"] != here["sha256"]  # it ran: dirtied
        assert (await d.ok("query-migrate"))["status"] == "completed"
        with pytest.raises(QMPError, match="paused due to previous migration"):
            await s.ok("migrate", uri="tcp:127.0.0.1:1")

    lab.run(body())


def test_incoming_with_S_ends_paused_and_cont_runs_it(lab: Lab) -> None:
    src = lab.start("src", "-seed", "2", "-S")
    dst = lab.start("dst", "-S", "-incoming", "tcp:127.0.0.1:0", "-dirty-rate", "1000")

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        with pytest.raises(QMPError, match="waiting for an incoming migration"):
            await d.ok("migrate", uri="tcp:127.0.0.1:1")
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{await incoming_port(d)}")
        assert (await wait_migration(s))["status"] == "completed"
        assert await status(s) == "postmigrate"  # it never ran: no STOP
        assert not [e for e in s.events if e["event"] == "STOP"]
        assert await status(d) == "paused"
        checksum = await d.ok("x-simvm-checksum")
        assert checksum["sha256"] == checksum["source-sha256"]
        assert checksum["sha256"] == (await s.ok("x-simvm-checksum"))["sha256"]
        await d.ok("cont")
        await d.event("RESUME")
        assert await status(d) == "running"
        await s.ok("cont")  # the source may run again after a completed migration (rollback)
        assert await status(s) == "running"

    lab.run(body())


def test_deferred_incoming_and_cont_while_inmigrate(lab: Lab) -> None:
    src = lab.start("src", "-seed", "3")
    dst = lab.start("dst", "-S", "-incoming", "defer")

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        assert await d.ok("query-migrate") == {}
        await d.ok("cont")  # QEMU: sets autostart, the guest starts when memory has arrived
        assert await status(d) == "inmigrate"
        await d.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
        with pytest.raises(QMPError, match="already been started"):
            await d.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{await incoming_port(d)}")
        assert (await wait_migration(s))["status"] == "completed"
        await d.event("RESUME")
        assert await status(d) == "running"

    lab.run(body())


NOT_CONVERGING = {"max-bandwidth": 16 << 20, "downtime-limit": 50}  # 16 MiB/s, 50 ms
FAST_DIRTY = ("-dirty-rate", "20000")  # 80 MB/s of dirtying on a 4 MiB guest


def test_no_convergence_then_cancel_leaves_the_source_running_and_intact(lab: Lab) -> None:
    src = lab.start("src", "-seed", "4", *FAST_DIRTY, mib=4)
    dst = lab.start("dst", "-incoming", "tcp:127.0.0.1:0", mib=4)

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        await s.ok("migrate-set-parameters", **NOT_CONVERGING)
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{await incoming_port(d)}")
        # pass after pass without converging: a pass's figures once a full pass at the cap
        # has been measured, then those of a later pass
        early = await wait_reply(s, "query-migrate", lambda i: passes_done(i) >= 3)
        late = await wait_reply(
            s, "query-migrate", lambda i: passes_done(i) > passes_done(early) + 1
        )
        assert early["status"] == late["status"] == "active"
        assert late["ram"]["dirty-sync-count"] > early["ram"]["dirty-sync-count"] >= 2
        assert late["ram"]["dirty-pages-rate"] > 0 and "cpu-throttle-percentage" not in late
        assert 80 < late["ram"]["mbps"] < 160  # about the 16 MiB/s (134 Mbit/s) cap
        await s.ok("migrate_cancel")
        info = await wait_migration(s)
        assert info["status"] == "cancelled"
        assert await status(s) == "running"
        assert not [e for e in s.events if e["event"] in ("STOP", "RESUME")]
        # QEMU's destination gives up when the stream breaks off, and so does simvm
        assert await dst.wait_exit() == 1
        # memory = the seed's content + the vCPU's own writes: a fresh simvm with the same
        # seed that does the same number of writes holds exactly the same bytes
        await s.ok("stop")
        mine = await s.ok("x-simvm-checksum")
        ref = lab.start("ref", "-seed", "4", "-S", mib=4)
        r = await ref.connect()
        await r.ok("x-simvm-dirty", pages=mine["writes"])
        assert mine["writes"] > 1000
        assert (await r.ok("x-simvm-checksum"))["sha256"] == mine["sha256"]

    lab.run(body())


def test_auto_converge_makes_the_same_case_converge(lab: Lab) -> None:
    src = lab.start("src", "-seed", "5", *FAST_DIRTY, mib=4)
    dst = lab.start("dst", "-incoming", "tcp:127.0.0.1:0", mib=4)

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        await s.ok("migrate-set-parameters", **NOT_CONVERGING)
        await s.ok(
            "migrate-set-capabilities",
            capabilities=[{"capability": "auto-converge", "state": True}],
        )
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{await incoming_port(d)}")
        info = await wait_migration(s, timeout=20)
        assert info["status"] == "completed", info
        assert info["cpu-throttle-percentage"] >= 20
        assert info["ram"]["dirty-sync-count"] >= 3
        there = await d.ok("x-simvm-checksum")
        assert there["source-sha256"] == (await s.ok("x-simvm-checksum"))["sha256"]

    lab.run(body())


def _flip_byte_at(at: int) -> Mangle:
    def mangle(offset: int, data: bytes) -> bytes:
        if offset <= at < offset + len(data):
            i = at - offset
            return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1 :]
        return data

    return mangle


def _cut_after(limit: int) -> Mangle:
    def mangle(offset: int, data: bytes) -> bytes | None:
        return None if offset + len(data) > limit else data

    return mangle


@pytest.mark.parametrize(
    ("mangle", "dst_says", "src_says"),
    [
        (_flip_byte_at(1_000_000), "page 243: CRC32 mismatch", "page 243: CRC32 mismatch"),
        (
            _cut_after(3_000_000),
            "stream ended early",
            "Unable to write to socket|closed the connection",
        ),
    ],
    ids=["corrupted", "truncated"],
)
def test_broken_stream_fails_the_migration(
    lab: Lab, mangle: Mangle, dst_says: str, src_says: str
) -> None:
    src = lab.start("src", "-seed", "6", "-dirty-rate", "500")
    dst = lab.start("dst", "-incoming", "tcp:127.0.0.1:0")

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        port = lab.proxy(("127.0.0.1", await incoming_port(d)), forth=mangle)
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = await wait_migration(s)
        assert info["status"] == "failed"
        assert re.search(src_says, info["error-desc"]), info
        assert await status(s) == "running"
        assert await dst.wait_exit() == 1
        assert f"simvm: load of migration failed: {dst_says}" in dst.log.read_text()

    lab.run(body())


def test_lost_acknowledgement_fails_the_migration_and_resumes_the_source(lab: Lab) -> None:
    """All memory arrives, but the ACK never comes back: the source, stopped for the
    switchover, must not stay stopped (QEMU resumes a source whose migration failed)."""
    src = lab.start("src", "-seed", "7", "-dirty-rate", "200", mib=4)
    dst = lab.start("dst", "-incoming", "tcp:127.0.0.1:0", mib=4)

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        port = lab.proxy(("127.0.0.1", await incoming_port(d)), back=lambda _o, _d: None)
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = await wait_migration(s)
        assert info["status"] == "failed", info
        assert "before acknowledging" in info["error-desc"]
        await s.event("STOP")
        await s.event("RESUME")
        assert await status(s) == "running"
        # the destination did get everything: it runs too (the operator's split brain,
        # exactly as with QEMU when the link dies at this instant)
        assert await status(d) == "running"

    lab.run(body())


def test_uuid_mismatch_is_refused(lab: Lab) -> None:
    src = lab.start("src", "-seed", "8", mib=4)
    dst = lab.start(
        "dst", "-incoming", "tcp:127.0.0.1:0", mib=4, uuid="00000000-0000-0000-0000-0000000000aa"
    )

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{await incoming_port(d)}")
        info = await wait_migration(s)
        assert info["status"] == "failed" and "VM uuid mismatch" in info["error-desc"]
        assert await dst.wait_exit() == 1

    lab.run(body())


# -- in-process: the stream format and the policy ----------------------------------------------


def _encode(memory: memoryview, passes: list[list[int]], pages: int) -> bytes:
    out = io.BytesIO()
    out.write(stream.Header(stream.PAGE_SIZE, pages, UUID).pack())
    scratch = memoryview(bytearray(64 * stream.PAGE_SIZE))
    for number, todo in enumerate(passes, 1):
        for i in range(0, len(todo), 64):
            batch = stream.encode_batch(memory, todo[i : i + 64], scratch)
            out.write(batch.head)
            out.write(batch.data)
        out.write(stream.encode_end_of_pass(number, len(todo), final=number == len(passes)))
    out.write(stream.encode_end(hashlib.sha256(memory).digest()))
    return out.getvalue()


def _load(raw: bytes, pages: int) -> bytes:
    memory = memoryview(bytearray(pages * stream.PAGE_SIZE))
    reader = stream.StreamReader(io.BytesIO(raw))
    header = stream.Header.parse(reader.read(stream.HEADER.size))
    assert header == stream.Header(stream.PAGE_SIZE, pages, UUID)
    return stream.Loader(reader, memory, header).run(lambda: hashlib.sha256(memory).digest())


def test_stream_round_trip_with_zero_pages_and_its_checks() -> None:
    pages = 200
    src = bytearray(os.urandom(pages * stream.PAGE_SIZE))
    for zero in (0, 5, 6, 150):
        src[zero * stream.PAGE_SIZE : (zero + 1) * stream.PAGE_SIZE] = bytes(stream.PAGE_SIZE)
    mem = memoryview(src)
    raw = _encode(mem, [list(range(pages)), [3, 5, 77, 199]], pages)
    assert _load(raw, pages) == hashlib.sha256(src).digest()
    batch = stream.encode_batch(mem, [4, 5, 6, 7], memoryview(bytearray(4 * stream.PAGE_SIZE)))
    assert (batch.normal, batch.zero) == (2, 2)
    assert batch.data.nbytes == 2 * stream.PAGE_SIZE

    bad = bytearray(raw)
    bad[stream.HEADER.size + 1 + stream.BATCH_HEAD.size + 64 * stream.ENTRY.size + 10] ^= 1
    with pytest.raises(stream.StreamError, match="CRC32 mismatch"):
        _load(bytes(bad), pages)
    with pytest.raises(stream.StreamError, match="stream ended early"):
        _load(raw[:-10], pages)
    with pytest.raises(stream.StreamError, match="memory checksum mismatch"):
        _load(raw[:-1] + bytes([raw[-1] ^ 1]), pages)
    # a page index bent to another valid page: every CRC holds, the final sha256 does not
    second_entry = stream.HEADER.size + 1 + stream.BATCH_HEAD.size + stream.ENTRY.size
    moved = bytearray(raw)
    moved[second_entry] ^= 1  # page 1's data now claims to be page 0's
    with pytest.raises(stream.StreamError, match="memory checksum mismatch"):
        _load(bytes(moved), pages)
    with pytest.raises(stream.StreamError, match="not a simvm migration stream"):
        _load(b"X" + raw[1:], pages)


MIB = 1 << 20


@pytest.mark.parametrize(
    ("stats", "auto", "throttle", "expected"),
    [
        # fits in downtime-limit (300 ms) at the measured bandwidth: switch over
        (PassStats(29 * MIB, 100 * MIB, 64 * MIB, 29 * MIB), False, 0, Decision(True, 0)),
        (PassStats(31 * MIB, 100 * MIB, 64 * MIB, 31 * MIB), False, 0, Decision(False, 0)),
        # a few pages always go, whatever the bandwidth
        (PassStats(8192, 0.0, 0, 8192), False, 0, Decision(True, 0)),
        # auto-converge: dirtied > 50 % of sent raises the throttle, initial then +increment
        (PassStats(60 * MIB, 16 * MIB, 4 * MIB, 3 * MIB), True, 0, Decision(False, 20)),
        (PassStats(60 * MIB, 16 * MIB, 4 * MIB, 3 * MIB), True, 20, Decision(False, 30)),
        (PassStats(60 * MIB, 16 * MIB, 4 * MIB, 3 * MIB), True, 95, Decision(False, 99)),
        (PassStats(60 * MIB, 16 * MIB, 4 * MIB, 1 * MIB), True, 20, Decision(False, 20)),
        (PassStats(60 * MIB, 16 * MIB, 4 * MIB, 3 * MIB), False, 0, Decision(False, 0)),
    ],
)
def test_precopy_policy(stats: PassStats, auto: bool, throttle: int, expected: Decision) -> None:
    assert decide(stats, Parameters(), auto, throttle) == expected


def test_migration_over_a_unix_socket(lab: Lab) -> None:
    """unix:PATH on both sides, as QEMU takes it (dstd's tunnelled incoming uses it)."""
    path = str(lab.tmp / "in.sock")
    src = lab.start("src", "-seed", "3", "-dirty-rate", "1000", mib=16)
    dst = lab.start("dst", "-incoming", f"unix:{path}", mib=16)

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        info = await d.ok("query-migrate")
        assert info["socket-address"] == [{"type": "unix", "path": path}]
        await s.ok("migrate", uri="unix:/nonexistent/x.sock")
        info = await wait_migration(s)
        assert info["status"] == "failed"
        assert info["error-desc"].startswith("Failed to connect to '/nonexistent/x.sock'")
        await s.ok("migrate", uri=f"unix:{path}")
        info = await wait_migration(s)
        assert info["status"] == "completed", info
        # the source completes once the last bytes are written; the destination runs once
        # it has read and loaded them, a moment later on a loaded machine
        await wait_reply(d, "query-status", lambda i: i.get("status") == "running", 10.0)
        here, there = await s.ok("x-simvm-checksum"), await d.ok("x-simvm-checksum")
        assert there["source-sha256"] == here["sha256"]

    lab.run(body())
