"""<currentMemory> at a domain's start (common/hypervisor.py ``_initial_memory``): libvirt
starts QEMU with all of <memory> and then sets the balloon's target to <currentMemory>; with
no balloon to hold it, the guest keeps all of <memory> and a warning names what was not
honoured. The integration test (test_qemu_memory.py) runs it against QEMU."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from vmmigrate.common.domainxml import parse_domain
from vmmigrate.common.hypervisor import EmulatorSettings, QMPHypervisor, RuntimeRecord

from tests.unit.test_qemuargv import memory_domain


def run(
    tmp_path: Path, xml: str, emulator: str, incoming: str = ""
) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """The QMP commands _initial_memory sends for ``xml`` run by ``emulator``, and its logs."""
    hv = QMPHypervisor(tmp_path, EmulatorSettings(default=emulator))
    sent: list[tuple[str, Any]] = []

    async def execute(uuid: str, command: str, arguments: Any = None, timeout: float = 10.0) -> Any:
        sent.append((command, arguments))
        return {}

    hv.execute = execute  # type: ignore[method-assign]
    d = parse_domain(xml)
    rec = RuntimeRecord(uuid=d.uuid, name=d.name, pid=0, start_ticks=0, qmp="", emulator=emulator,
                        argv=(), log="", started_unix=0.0, incoming=incoming)  # fmt: skip
    with capture_logs() as logs:
        asyncio.run(hv._initial_memory(d, rec))
    return sent, logs


def test_qemu_with_a_balloon_gets_its_target_in_bytes(tmp_path: Path) -> None:
    sent, logs = run(tmp_path, memory_domain("64"), "qemu")
    assert sent == [("balloon", {"value": 64 << 20})]
    assert not [e for e in logs if e["log_level"] == "warning"]


def test_nothing_is_set_when_current_memory_is_all_of_memory(tmp_path: Path) -> None:
    sent, logs = run(tmp_path, memory_domain("128"), "qemu")
    assert sent == []
    assert not [e for e in logs if e["log_level"] == "warning"]


@pytest.mark.parametrize(
    ("emulator", "balloon"),
    [("qemu", "<memballoon model='none'/>"), ("qemu", ""), ("simvm", "<memballoon model='virtio'/>")],
)
def test_without_a_balloon_current_memory_is_not_honoured_and_a_warning_says_so(
    tmp_path: Path, emulator: str, balloon: str
) -> None:
    sent, logs = run(tmp_path, memory_domain("64", balloon), emulator)
    assert sent == []
    warned = [e for e in logs if e["event"] == "current_memory_ignored"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["current_memory_kib"] == 65536 and warned[0]["memory_kib"] == 131072
    assert "<currentMemory>" in warned[0]["reason"]


def test_an_incoming_migration_sets_no_target(tmp_path: Path) -> None:
    """The balloon's target and size are part of the guest's state the migration brings."""
    sent, logs = run(tmp_path, memory_domain("64"), "qemu", incoming="tcp:127.0.0.1:49152")
    assert sent == []
    assert not [e for e in logs if e["event"] == "current_memory_ignored"]
