"""The Perform watch loop against a scripted hypervisor: how the stream's end is reported."""

from __future__ import annotations

import asyncio
import contextlib
import types
from typing import Any

import pytest
from vmmigrate.common.errors import OperationFailed
from vmmigrate.common.rpc import Deadline
from vmmigrate.srcd import perform
from vmmigrate.srcd.jobs import SourceJob, SourceParams


class ScriptedHypervisor:
    """query-migrate answers from a script; migrate_cancel switches to the cancel script."""

    def __init__(self, before: list[str], after_cancel: list[str]) -> None:
        self.before = before
        self.after_cancel = after_cancel
        self.cancelled = False
        self.commands: list[str] = []

    async def execute(self, uuid: str, command: str, args: Any = None) -> dict[str, Any]:
        self.commands.append(command)
        if command == "migrate_cancel":
            self.cancelled = True
            return {}
        script = self.after_cancel if self.cancelled else self.before
        status = script.pop(0) if len(script) > 1 else script[0]
        return {"status": status, "error-desc": "Unable to write to socket: Broken pipe"}


def _job() -> SourceJob:
    domain = types.SimpleNamespace(uuid="u", name="vm")
    return SourceJob(
        migration_id="m",
        domain=domain,  # type: ignore[arg-type]
        flags=perform.MigrateFlag.LIVE,
        params=SourceParams(),
        peer="127.0.0.1:1",
        deadline=Deadline(60.0),
        record=None,  # type: ignore[arg-type]
        lock=None,  # type: ignore[arg-type]
        cleanup=contextlib.AsyncExitStack(),
    )


def _ctx(hv: ScriptedHypervisor) -> Any:
    return types.SimpleNamespace(
        hypervisor=hv, config=types.SimpleNamespace(migration_poll_interval=0.001)
    )


def test_lost_destination_is_reported_as_such() -> None:
    """The keepalive lost the peer: the loop cancels the stream, which QEMU reports as
    "failed" (the socket broke first): libvirt says "Lost connection to destination host"."""
    hv = ScriptedHypervisor(before=["active"], after_cancel=["failed"])
    job = _job()
    job.peer_lost = True
    with pytest.raises(OperationFailed, match=r"^Lost connection to destination host$"):
        asyncio.run(perform._watch(_ctx(hv), job, asyncio.Queue()))
    assert "migrate_cancel" in hv.commands
    assert job.outcome == "cancelled"


def test_failed_stream_without_cancel_is_a_failure() -> None:
    hv = ScriptedHypervisor(before=["active", "failed"], after_cancel=["failed"])
    job = _job()
    with pytest.raises(OperationFailed, match="job 'migration out' failed: Unable to write"):
        asyncio.run(perform._watch(_ctx(hv), job, asyncio.Queue()))
    assert job.outcome == "failed"
