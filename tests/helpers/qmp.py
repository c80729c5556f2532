"""A tiny synchronous QMP client for tests: talk to a domain's emulator directly."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


def runtime_record(state_dir: Path, uuid: str) -> dict[str, Any] | None:
    path = state_dir / "run" / f"{uuid}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class QMP:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:  # an emulator not listening yet (or gone): no socket left open behind
            self.sock.connect(path)
            self.file = self.sock.makefile("rwb")
            greeting = json.loads(self.file.readline())
            assert "QMP" in greeting
            self.cmd("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def cmd(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qmp_for(state_dir: Path, uuid: str) -> QMP:
    rec = runtime_record(state_dir, uuid)
    assert rec is not None, f"domain {uuid} is not running under {state_dir}"
    return QMP(rec["qmp"])


def pci_layout(q: QMP, timeout: float = 60.0) -> list[tuple[Any, ...]]:
    """The guest's PCI layout from query-pci: where each device sits (bus, slot, function)
    and what it is (qdev id, vendor, device, class), once the firmware has numbered the
    buses behind every bridge (seen still unnumbered right after a start under load: the
    devices behind a bridge are listed only then). Leaves out the BARs and IRQs, which
    the firmware may still be programming."""
    deadline = time.monotonic() + timeout
    while True:
        buses = q.cmd("query-pci")
        bridges = [d["pci_bridge"] for b in buses for d in b["devices"] if "pci_bridge" in d]
        if all(br["bus"]["secondary"] > 0 for br in bridges):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"the firmware numbered no bus behind a bridge in {timeout} s")
        time.sleep(0.1)
    out: list[tuple[Any, ...]] = []

    def walk(devices: list[dict[str, Any]]) -> None:
        for d in devices:
            out.append((d["bus"], d["slot"], d["function"], d["qdev_id"], d["id"]["vendor"],
                        d["id"]["device"], d["class_info"]["class"]))  # fmt: skip
            walk(d.get("pci_bridge", {}).get("devices", []))

    for bus in buses:
        walk(bus["devices"])
    return sorted(out)
