"""Migration ports: an incoming emulator that loses its port to another socket (the range
may overlap the kernel's ephemeral ports) is started again on the next free port."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest
from vmmigrate.common.errors import OperationFailed
from vmmigrate.dstd.phases import PORT_ATTEMPTS, _start_incoming
from vmmigrate.dstd.ports import PortAllocator


class RacingHypervisor:
    """Starts an "emulator" by binding its incoming port for real; before the first start,
    another socket takes the port the allocator just handed out (the race)."""

    def __init__(self, races: int) -> None:
        self.races = races
        self.thieves: list[socket.socket] = []
        self.listening: list[socket.socket] = []

    async def start(self, d: Any, *, paused: bool, incoming: str) -> None:
        host, port = incoming.removeprefix("tcp:").rsplit(":", 1)
        if self.races:
            self.races -= 1
            thief = socket.socket()
            thief.bind((host, int(port)))  # an outgoing connection's local port, say
            self.thieves.append(thief)
        s = socket.socket()
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            s.close()
            raise OperationFailed(f"emulator exited with status 1: Failed to bind socket: "
                                  f"{exc.strerror}") from exc
        s.listen()
        self.listening.append(s)

    def close(self) -> None:
        for s in self.thieves + self.listening:
            s.close()


def _free_range(n: int) -> tuple[int, int]:
    for lo in range(42000, 43000, n):
        ok = True
        for p in range(lo, lo + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return lo, lo + n - 1
    raise AssertionError("no free port range")


def _lab(races: int) -> tuple[int, PortAllocator, RacingHypervisor, Any, Any]:
    """A free port range, its allocator, a hypervisor losing ``races`` races, a job, a ctx."""
    lo, hi = _free_range(PORT_ATTEMPTS + 1)
    ports = PortAllocator(lo, hi)
    hv = RacingHypervisor(races)
    job = SimpleNamespace(host="127.0.0.1", port=0, migration_id="m")
    return lo, ports, hv, job, SimpleNamespace(ports=ports, hypervisor=hv)


@pytest.mark.parametrize("races", [1, PORT_ATTEMPTS - 1])
def test_incoming_emulator_moves_to_the_next_port_after_losing_a_race(races: int) -> None:
    lo, ports, hv, job, ctx = _lab(races)
    try:
        uri = asyncio.run(_start_incoming(ctx, job, None))  # type: ignore[arg-type]
        assert uri == f"tcp:127.0.0.1:{lo + races}" and job.port == lo + races
        # the lost ports went back to the allocator; the one in use did not
        assert ports._used == {lo + races}
    finally:
        hv.close()


def test_incoming_emulator_gives_up_after_so_many_races() -> None:
    lo, ports, hv, job, ctx = _lab(PORT_ATTEMPTS)
    try:
        with pytest.raises(OperationFailed, match="Address already in use"):
            asyncio.run(_start_incoming(ctx, job, None))  # type: ignore[arg-type]
        assert ports._used == {lo + PORT_ATTEMPTS - 1}  # the caller's drop releases job.port
    finally:
        hv.close()
